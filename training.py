"""Train DMAP with self-supervised supervoxel episodes (or ground-truth episodes with ``use_gt``).

Single process::

    python training.py with dataset=CHAOST2 setting=1 eval_fold=0 data_root=../shared/data

Several GPUs or CPU processes (one process each; gradients averaged by DistributedDataParallel)::

    torchrun --nproc_per_node=4 training.py with dataset=CHAOST2 eval_fold=0

Each step consumes ``batch_size * world_size`` episodes from one seeded stream: episode number
``step * batch_size * world_size + rank * batch_size + j``. So a run is reproducible, ranks never see the
same episode, and N processes with batch b follow the same data as one process with batch N*b.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from config import ConfigError, configure_logging, make_experiment, one_line_errors, resolve_config
from dataloaders.dataset_specifics import get_dataset_spec
from dataloaders.episodes import GroundTruthEpisodes, SupervoxelEpisodes, build_training_cases
from dataloaders.resize import ResizedEpisodes
from dataloaders.folds import fold_volume_ids
from dataloaders.transforms import augment_params
from models.fewshot import FewShotSeg
from models.losses import focal_loss
from util.checkpoints import (
    FINAL_NAME,
    STEP_PREFIX,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    step_checkpoint_name,
)
from util.amp import AmpUnsupported, autocast, resolve_amp
from util.distributed import DistributedContext, barrier, init_distributed, shutdown_distributed
from util.logger import ScalarLogger

LOGGER = logging.getLogger("training")


class EpisodeIndexSampler(Sampler[int]):
    """Episode numbers of one rank, from ``start_step`` on (see the module docstring)."""

    def __init__(self, start_step: int, n_steps: int, batch_size: int, rank: int, world_size: int):
        self.start_step, self.n_steps = start_step, n_steps
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        per_step = self.batch_size * self.world_size
        for step in range(self.start_step, self.n_steps):
            first = step * per_step + self.rank * self.batch_size
            yield from range(first, first + self.batch_size)

    def __len__(self) -> int:
        return max(0, self.n_steps - self.start_step) * self.batch_size


def build_episodes(cfg: dict[str, Any]) -> torch.utils.data.Dataset:
    """Training episodes for every step of the run (all ranks share one indexable stream)."""
    spec = get_dataset_spec(cfg["dataset"])
    cases = build_training_cases(cfg["data_dir"], spec, cfg["eval_fold"], n_sv=cfg["n_sv"], use_gt=cfg["use_gt"],
                                 sv_dir=cfg["supervoxel_dir"], volumes=cfg.get("volumes"))
    world_size = int(torch.distributed.get_world_size()) if torch.distributed.is_initialized() else 1
    n_episodes = cfg["n_steps"] * cfg["batch_size"] * world_size
    common = dict(n_episodes=n_episodes, n_shot=cfg["n_shot"], exclude_labels=tuple(cfg["exclude_label"]),
                  exclude_mode=cfg["exclude_mode"], augment=cfg["augment"], seed=cfg["seed"],
                  sampler=cfg["sampler"], augment_params=augment_params(cfg["augment_profile"]))
    if cfg["use_gt"]:
        episodes = GroundTruthEpisodes(cases, test_labels=tuple(cfg["test_label"]), **common)
    else:
        episodes = SupervoxelEpisodes(cases, min_pixels=cfg["min_fg_pixels"], **common)
    return ResizedEpisodes(episodes, cfg["image_size"]) if cfg.get("image_size") else episodes


def set_train_mode(model: torch.nn.Module, freeze_bn: bool) -> None:
    """``model.train()``, optionally keeping batch-norm layers on their running statistics."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def episode_loss(probs: torch.Tensor, query_masks: torch.Tensor, gamma: float = 0.7,
                 class_weights: tuple[float, float] = (0.1, 1.0)) -> torch.Tensor:
    """Focal loss of each episode, averaged over the episodes of the batch.

    Args:
        probs: [B, Q, 2, H, W] background/foreground probabilities.
        query_masks: [B, Q, H, W] binary ground truth.
        gamma, class_weights: focal-loss parameters (the paper: 0.7 and background 0.1 / foreground 1.0).
    """
    losses = [focal_loss(probs[b].float(), query_masks[b], gamma=gamma, class_weights=tuple(class_weights))
              for b in range(probs.shape[0])]
    return torch.stack(losses).mean()


def _time_is_up(deadline: float, ctx: DistributedContext) -> bool:
    """Whether the wall-clock budget is spent, agreed by all ranks (rank 0's clock decides)."""
    if deadline == math.inf:
        return False
    up = torch.tensor([float(time.monotonic() >= deadline)], device=ctx.device)
    if ctx.distributed:
        torch.distributed.broadcast(up, src=0)
    return bool(up.item())


def _prune_snapshots(snapshot_dir: Path, keep: int, eval_step: int | None = None) -> None:
    """Delete all but the ``keep`` newest step snapshots; the ``eval_step`` snapshot is always kept."""
    protected = snapshot_dir / step_checkpoint_name(eval_step) if eval_step else None
    snapshots = [p for p in sorted(snapshot_dir.glob(f"{STEP_PREFIX}*.pth")) if p != protected]
    for old in snapshots[: max(0, len(snapshots) - keep)]:
        old.unlink(missing_ok=True)


def train(
    cfg: dict[str, Any],
    sacred_run: Any = None,
    step_callback: Callable[[int, torch.nn.Module], None] | None = None,
) -> Path:
    """Run (or resume) training as configured.

    Args:
        cfg: a config resolved by :func:`config.resolve_config`.
        sacred_run: the Sacred run for ``metrics.json`` (None outside Sacred).
        step_callback: called with the number of completed steps and the (unwrapped) model after each
            step; tests use it to interrupt a run or inspect the weights of each rank.

    Returns:
        Path of the final checkpoint.
    """
    ctx = init_distributed(cfg["device"])
    try:
        return _train(cfg, ctx, sacred_run, step_callback)
    finally:
        shutdown_distributed()


def _train(cfg: dict[str, Any], ctx: DistributedContext, sacred_run: Any,
           step_callback: Callable[[int, torch.nn.Module], None] | None) -> Path:
    device = ctx.device
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg["cudnn_benchmark"])
    snapshot_dir = Path(cfg["snapshot_dir"])
    final_path = snapshot_dir / FINAL_NAME

    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
    model = FewShotSeg.from_config(cfg["model"]).to(device)
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["optim"]["lr"], momentum=cfg["optim"]["momentum"],
                                weight_decay=cfg["optim"]["weight_decay"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg["lr_step_size"], gamma=cfg["lr_gamma"])
    try:
        amp = resolve_amp(cfg["amp"], device)
    except AmpUnsupported as exc:
        raise ConfigError(str(exc)) from None
    LOGGER.info("device %s, precision %s (amp=%s)", device, "fp32" if amp == "off" else amp, cfg["amp"])
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    start_step = 0
    if cfg["resume"]:
        last = latest_checkpoint(snapshot_dir)
        if last is None:
            LOGGER.warning("resume=True but no snapshot in %s: starting from step 0", snapshot_dir)
        else:
            state = load_checkpoint(last, map_location=device)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            restore_rng_state(state["rng"])
            start_step = int(state["step"])
            LOGGER.info("resumed from %s at step %d of %d", last, start_step, cfg["n_steps"])
    if start_step >= cfg["n_steps"] and final_path.is_file():
        LOGGER.info("%s already holds the finished run (%d steps)", final_path, start_step)
        return final_path

    train_ids, held_out = fold_volume_ids(cfg["data_dir"], get_dataset_spec(cfg["dataset"]), cfg["eval_fold"],
                                          cfg.get("volumes"))
    if ctx.is_main:
        LOGGER.info("%s fold %d: training on volumes %s; held out for evaluation %s", cfg["dataset"],
                    cfg["eval_fold"], train_ids, held_out)
    # test.py checks these against the fold it evaluates
    fold_record = {"dataset": cfg["dataset"], "setting": cfg["setting"], "eval_fold": cfg["eval_fold"],
                   "train_ids": train_ids, "test_ids": held_out}
    episodes = build_episodes(cfg)
    sampler = EpisodeIndexSampler(start_step, cfg["n_steps"], cfg["batch_size"], ctx.rank, ctx.world_size)
    workers = cfg["num_workers"]
    loader = DataLoader(
        episodes, batch_size=cfg["batch_size"], sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    net: torch.nn.Module = model
    if ctx.distributed:
        # LTG parameters get no gradient in the fixed/off ablations
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=cfg["model"]["dmap_mode"] != "learned")
    set_train_mode(net, cfg["model"]["freeze_bn"])

    scalars = None
    if ctx.is_main:
        scalars = ScalarLogger(sacred_run, Path(cfg["run_dir"]) / "tensorboard" if cfg["tensorboard"] else None)

    def snapshot(step: int, path: Path) -> None:
        if ctx.is_main:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                             "step": step, "rng": capture_rng_state(), "config": cfg, "fold": fold_record}, path)
        barrier(ctx)

    step = start_step
    deadline = time.monotonic() + 60 * cfg["time_limit_min"] if cfg["time_limit_min"] > 0 else math.inf
    progress = tqdm(total=cfg["n_steps"], initial=start_step, disable=not ctx.is_main, desc="train",
                    dynamic_ncols=True)
    try:
        for batch in loader:
            support_images = batch["support_images"].to(device, non_blocking=True)
            support_masks = batch["support_masks"].to(device, non_blocking=True)
            query_images = batch["query_images"].to(device, non_blocking=True)
            query_masks = batch["query_masks"].to(device, non_blocking=True)
            with autocast(device, amp):
                probs, aux = net(support_images, support_masks, query_images)
            loss = episode_loss(probs, query_masks, cfg["loss"]["gamma"], cfg["loss"]["class_weights"])
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}; lower optim.lr or use amp=off")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1

            if ctx.is_main:
                progress.update(1)
                # the auxiliary values live on the device: read them only when they are logged
                if step % cfg["log_every"] == 0 or step == cfg["n_steps"]:
                    logged = {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}
                    for key in ("tau", "xi", "kept_fraction"):
                        if aux.get(key) is not None:
                            logged[key] = float(torch.as_tensor(aux[key]).float().mean())
                    progress.set_postfix({k: f"{v:.3g}" for k, v in logged.items() if k != "lr"})
                    scalars.log(logged, step)
            # the evaluated snapshot (eval_step) is written even off the save_snapshot_every grid
            if (step % cfg["save_snapshot_every"] == 0 or step == cfg["eval_step"]) and step < cfg["n_steps"]:
                snapshot(step, snapshot_dir / step_checkpoint_name(step))
                if ctx.is_main:
                    _prune_snapshots(snapshot_dir, cfg["keep_snapshots"], cfg["eval_step"])
            if step_callback is not None:
                step_callback(step, model)
            if _time_is_up(deadline, ctx):
                LOGGER.warning("time_limit_min=%s reached after %d of %d steps; the weights so far are saved and "
                               "resume=True continues", cfg["time_limit_min"], step, cfg["n_steps"])
                snapshot(step, snapshot_dir / step_checkpoint_name(step))
                break
    except KeyboardInterrupt:
        if step > start_step:
            LOGGER.warning("interrupted: saving step %d so resume=True continues from it", step)
            snapshot(step, snapshot_dir / step_checkpoint_name(step))
        raise
    finally:
        progress.close()
        if scalars is not None:
            scalars.close()
    snapshot(step, final_path)
    if ctx.is_main:
        LOGGER.info("stopped after %d of %d steps; weights in %s", step, cfg["n_steps"], final_path)
    return final_path


def check_training_inputs(cfg: dict[str, Any]) -> None:
    """Checks made before Sacred creates a run folder: the volumes of the fold (see ``fold_volume_ids``)."""
    fold_volume_ids(cfg["data_dir"], get_dataset_spec(cfg["dataset"]), cfg["eval_fold"], cfg.get("volumes"))


ex = make_experiment("train", validate=check_training_inputs)


@ex.main
def main(_run, _config):
    """Sacred entry point: validate, then train (user errors end as one line on stderr)."""
    with one_line_errors("train"):
        cfg = resolve_config(_config)
        return str(train(cfg, sacred_run=_run))


if __name__ == "__main__":
    configure_logging()
    ex.run_commandline()
