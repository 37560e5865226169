"""Train DMAP with self-supervised supervoxel episodes (or ground-truth episodes with ``use_gt``).

Single process::

    python training.py with dataset=CHAOST2 setting=1 eval_fold=0 data_root=data

Several GPUs or CPU processes (one process each; gradients averaged by DistributedDataParallel)::

    torchrun --nproc_per_node=4 training.py with dataset=CHAOST2 eval_fold=0

This file turns the config into the arguments of the library: episodes (:mod:`dataloaders.episodes`),
which episode each rank draws at each step (:mod:`trainer.episode_sampler`), the model and optimiser
(:mod:`trainer.state`) and the loop (:mod:`trainer.loop`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from config import (ConfigError, configure_logging, format_differences, make_experiment, one_line_errors,
                    resolve_config, training_differences)
from dataloaders.dataset_specifics import get_dataset_spec
from dataloaders.episodes import build_training_cases, build_training_episodes
from dataloaders.folds import fold_volume_ids
from dataloaders.resize import ResizedEpisodes
from models.dmap import LTG_MODES
from trainer.episode_sampler import EpisodeIndexSampler, episode_loader
from trainer.loop import LoopSettings, set_train_mode, train_loop
from trainer.state import OptimSettings, build_training_state, resume_training_state, save_training_state
from util.amp import resolve_amp
from util.checkpoints import FINAL_NAME, latest_checkpoint, load_checkpoint
from util.distributed import DistributedContext, init_distributed, shutdown_distributed
from util.logger import ScalarLogger

LOGGER = logging.getLogger("training")


def build_episodes(cfg: dict[str, Any], world_size: int = 1) -> Dataset:
    """Training episodes for every step of the run (all ranks share one indexable stream)."""
    cases = build_training_cases(cfg["data_dir"], get_dataset_spec(cfg["dataset"]), cfg["eval_fold"],
                                 n_sv=cfg["n_sv"], use_gt=cfg["use_gt"], sv_dir=cfg["supervoxel_dir"],
                                 volumes=cfg.get("volumes"))
    episodes = build_training_episodes(
        cases, cfg["n_steps"] * cfg["batch_size"] * world_size, use_gt=cfg["use_gt"],
        test_labels=cfg["test_label"], exclude_labels=cfg["exclude_label"], exclude_mode=cfg["exclude_mode"],
        n_shot=cfg["n_shot"], augment=cfg["augment"], seed=cfg["seed"], min_pixels=cfg["min_fg_pixels"],
        sampler=cfg["sampler"], augment_profile=cfg["augment_profile"], support_spill_px=cfg["support_spill_px"])
    return ResizedEpisodes(episodes, cfg["image_size"]) if cfg.get("image_size") else episodes


def optim_settings(cfg: dict[str, Any]) -> OptimSettings:
    return OptimSettings(lr=cfg["optim"]["lr"], momentum=cfg["optim"]["momentum"],
                         weight_decay=cfg["optim"]["weight_decay"], lr_step_size=cfg["lr_step_size"],
                         lr_gamma=cfg["lr_gamma"], lr_schedule=cfg["lr_schedule"], n_steps=cfg["n_steps"],
                         lr_final_factor=cfg["lr_final_factor"], lr_warmup_steps=cfg["lr_warmup_steps"],
                         ema_decay=cfg["ema_decay"], ema_warmup=cfg["ema_warmup"],
                         grad_clip=cfg["optim"]["grad_clip"])


def loop_settings(cfg: dict[str, Any]) -> LoopSettings:
    return LoopSettings(n_steps=cfg["n_steps"], log_every=cfg["log_every"],
                        save_snapshot_every=cfg["save_snapshot_every"], eval_step=cfg["eval_step"],
                        keep_snapshots=cfg["keep_snapshots"], time_limit_min=cfg["time_limit_min"],
                        loss_gamma=cfg["loss"]["gamma"], class_weights=tuple(cfg["loss"]["class_weights"]),
                        loss_normalize=cfg["loss"]["normalize"])


def train(cfg: dict[str, Any], sacred_run: Any = None,
          step_callback: Callable[[int, torch.nn.Module], None] | None = None) -> Path:
    """Run (or resume) training as configured; returns the path of the final checkpoint.

    Args:
        cfg: a config resolved by :func:`config.resolve_config`.
        sacred_run: the Sacred run for ``metrics.json`` (None outside Sacred).
        step_callback: called with the number of completed steps and the (unwrapped) model after each
            step; tests use it to interrupt a run or inspect the weights of each rank.
    """
    ctx = init_distributed(cfg["device"])
    try:
        return _train(cfg, ctx, sacred_run, step_callback)
    finally:
        shutdown_distributed()


def _train(cfg: dict[str, Any], ctx: DistributedContext, sacred_run: Any,
           step_callback: Callable[[int, torch.nn.Module], None] | None) -> Path:
    device, snapshot_dir = ctx.device, Path(cfg["snapshot_dir"])
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg["cudnn_benchmark"])
    amp = resolve_amp(cfg["amp"], device)
    LOGGER.info("device %s, precision %s (amp=%s)", device, "fp32" if amp == "off" else amp, cfg["amp"])
    train_ids, held_out = fold_volume_ids(cfg["data_dir"], get_dataset_spec(cfg["dataset"]), cfg["eval_fold"],
                                          cfg.get("volumes"))
    # test.py checks these against the fold it evaluates
    fold = {"dataset": cfg["dataset"], "setting": cfg["setting"], "eval_fold": cfg["eval_fold"],
            "train_ids": train_ids, "test_ids": held_out}
    check_run_folder(cfg)
    state = build_training_state(cfg["model"], optim_settings(cfg), amp, device, cfg["seed"], cfg["channels_last"],
                                 record={"config": cfg, "fold": fold, "precision": amp})
    if cfg["resume"]:
        resumed = resume_training_state(state, snapshot_dir, device)
        if resumed is None:
            LOGGER.warning("resume=True but no snapshot in %s: starting from step 0", snapshot_dir)
        else:
            LOGGER.info("resumed from %s at step %d of %d", resumed, state.step, cfg["n_steps"])
    if state.step >= cfg["n_steps"] and (snapshot_dir / FINAL_NAME).is_file():
        LOGGER.info("%s already holds the finished run (%d steps)", snapshot_dir / FINAL_NAME, state.step)
        return snapshot_dir / FINAL_NAME
    if ctx.is_main:
        LOGGER.info("%s fold %d: training on volumes %s; held out for evaluation %s", cfg["dataset"],
                    cfg["eval_fold"], train_ids, held_out)
    sampler = EpisodeIndexSampler(state.step, cfg["n_steps"], cfg["batch_size"], ctx.rank, ctx.world_size)
    loader = episode_loader(build_episodes(cfg, ctx.world_size), sampler, cfg["num_workers"], device)
    net: torch.nn.Module = state.model
    if ctx.distributed:  # LTG parameters get no gradient in the fixed/off ablations
        net = DistributedDataParallel(state.model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=cfg["model"]["dmap_mode"] not in LTG_MODES)
    set_train_mode(net, cfg["model"]["freeze_bn"])
    scalars = ScalarLogger(sacred_run, Path(cfg["run_dir"]) / "tensorboard" if cfg["tensorboard"] else None) \
        if ctx.is_main else None
    try:
        train_loop(state, net, loader, snapshot_dir, loop_settings(cfg), ctx, scalars, step_callback)
    finally:
        if scalars is not None:
            scalars.close()
    save_training_state(state, snapshot_dir / FINAL_NAME, ctx)
    if ctx.is_main:
        LOGGER.info("stopped after %d of %d steps; weights in %s", state.step, cfg["n_steps"], snapshot_dir / FINAL_NAME)
    return snapshot_dir / FINAL_NAME


def check_run_folder(cfg: dict[str, Any]) -> None:
    """Refuse to resume (or restart over) a run folder whose newest snapshot was trained with another config.

    Raises:
        ConfigError: one line naming the folder and each differing training-relevant key.
    """
    last = latest_checkpoint(cfg["snapshot_dir"])
    if last is None:
        return
    stored = load_checkpoint(last, mmap=True).get("config")
    if not isinstance(stored, dict):
        LOGGER.warning("%s holds no training config: the run folder's recipe is not checked", last)
        return
    differences = training_differences(stored, cfg)
    if differences:
        action = "resume=True would continue it" if cfg["resume"] else "starting over would overwrite it"
        raise ConfigError(f"{Path(cfg['snapshot_dir']).parent} holds a run trained with another config "
                          f"({format_differences(differences, 'stored', 'now')}); {action} with this one; use "
                          "the stored config, or another path.log_dir or tag")


def check_training_inputs(cfg: dict[str, Any]) -> None:
    """Checks made before Sacred creates a run folder: the volumes of the fold (see ``fold_volume_ids``), the
    run folder's recipe (:func:`check_run_folder`), no evaluation-only override."""
    if cfg.get("eval_override"):
        raise ConfigError(f"config key 'eval_override' is {cfg['eval_override']!r}: it changes an evaluation "
                          "(test.py), not training")
    fold_volume_ids(cfg["data_dir"], get_dataset_spec(cfg["dataset"]), cfg["eval_fold"], cfg.get("volumes"))
    check_run_folder(cfg)


ex = make_experiment("train", validate=check_training_inputs)


@ex.main
def main(_run, _config, eval_override):  # noqa: ARG001 (named so that Sacred reports eval_override itself)
    """Sacred entry point: validate, then train (user errors end as one line on stderr)."""
    with one_line_errors("train"):
        cfg = resolve_config(_config)
        return str(train(cfg, sacred_run=_run))


if __name__ == "__main__":
    configure_logging()
    ex.run_commandline()
