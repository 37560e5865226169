"""The optimisation loop: one focal-loss step per batch of episodes, logging, snapshots, stopping.

The loop stops after ``n_steps`` steps, when the wall-clock budget ``time_limit_min`` is spent (all ranks
agree, rank 0's clock decides) or on Ctrl-C; in the last two cases the weights so far are saved as a step
snapshot first, so ``resume=True`` continues from them.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from tqdm import tqdm

from trainer.state import TrainingState, save_training_state
from util.amp import autocast
from util.checkpoints import step_checkpoint_name, step_snapshots
from util.distributed import DistributedContext
from util.logger import ScalarLogger

LOGGER = logging.getLogger("training")

__all__ = ["LoopSettings", "set_train_mode", "prune_snapshots", "train_loop"]

#: the auxiliary outputs that are logged: the query threshold offset tau, the de-biasing threshold xi, the
#: kept fraction of support pixels, the alignment loss and learned scalar threshold of the methods that have
#: them, and the fractions of query pixels predicted (p > 0.5) and labelled foreground: a run that drifts to
#: the all-background solution shows pred_fg_fraction -> 0
LOGGED_AUX = ("tau", "xi", "kept_fraction", "align_loss", "threshold", "pred_fg_fraction", "true_fg_fraction")


@dataclass(frozen=True)
class LoopSettings:
    """How long the loop runs and what it records.

    Attributes:
        n_steps: steps of the whole run (a resumed run stops there too).
        log_every: steps between logged scalars.
        save_snapshot_every: steps between step snapshots.
        eval_step: the step whose snapshot evaluation reads; written even off the snapshot grid and never
            pruned (None or 0: none).
        keep_snapshots: step snapshots kept (older ones deleted).
        time_limit_min: wall-clock budget in minutes (0: none).
        loss_gamma, class_weights, loss_normalize: focal-loss parameters (:func:`models.losses.episode_loss`).
    """

    n_steps: int
    log_every: int
    save_snapshot_every: int
    eval_step: Optional[int]
    keep_snapshots: int
    time_limit_min: float = 0.0
    loss_gamma: float = 0.7
    class_weights: tuple = (0.1, 1.0)
    loss_normalize: str = "pixels"


def set_train_mode(model: torch.nn.Module, freeze_bn: bool) -> None:
    """``model.train()``, optionally keeping batch-norm layers on their running statistics."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def prune_snapshots(snapshot_dir: Path, keep: int, eval_step: Optional[int] = None) -> None:
    """Delete all but the ``keep`` newest step snapshots; the ``eval_step`` snapshot is always kept."""
    protected = snapshot_dir / step_checkpoint_name(eval_step) if eval_step else None
    snapshots = [p for p in step_snapshots(snapshot_dir) if p != protected]
    for old in snapshots[: max(0, len(snapshots) - keep)]:
        old.unlink(missing_ok=True)


def _time_is_up(deadline: float, ctx: DistributedContext) -> bool:
    """Whether the wall-clock budget is spent, agreed by all ranks (rank 0's clock decides)."""
    if deadline == math.inf:
        return False
    up = torch.tensor([float(time.monotonic() >= deadline)], device=ctx.device)
    if ctx.distributed:
        torch.distributed.broadcast(up, src=0)
    return bool(up.item())


def _optimisation_step(state: TrainingState, net: torch.nn.Module, batch: dict[str, torch.Tensor],
                       device: torch.device, settings: LoopSettings) -> tuple[torch.Tensor, dict[str, Any]]:
    """Forward, loss, backward and update on one batch; returns (loss, the model's auxiliary outputs).

    Raises:
        FloatingPointError: the loss is not finite (the weights are left as they were).
    """
    support_images, support_masks, query_images, query_masks = (
        batch[key].to(device, non_blocking=True)
        for key in ("support_images", "support_masks", "query_images", "query_masks"))
    with autocast(device, state.amp):
        probs, aux = net(support_images, support_masks, query_images)
    loss = state.model.training_loss(probs, aux, query_masks, settings.loss_gamma, settings.class_weights,
                                     settings.loss_normalize)
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"loss is {loss.item()} at step {state.step + 1}; lower optim.lr or use amp=off")
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if state.grad_clip > 0:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), state.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    if state.averaged is not None:
        state.averaged.update_parameters(state.model)
    state.step += 1
    with torch.no_grad():
        aux = dict(aux, pred_fg_fraction=(probs[..., 1, :, :] > 0.5).float().mean(),
                   true_fg_fraction=(query_masks > 0).float().mean())
    return loss, aux


def _logged_scalars(state: TrainingState, loss: torch.Tensor, aux: dict[str, Any]) -> dict[str, float]:
    """Loss, learning rate and the batch means of the auxiliary outputs (read from the device only here)."""
    logged = {"loss": loss.item(), "lr": state.optimizer.param_groups[0]["lr"]}
    for key in LOGGED_AUX:
        if aux.get(key) is not None:
            logged[key] = float(torch.as_tensor(aux[key]).float().mean())
    return logged


def train_loop(state: TrainingState, net: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
               snapshot_dir: Path, settings: LoopSettings, ctx: DistributedContext,
               scalars: Optional[ScalarLogger] = None,
               step_callback: Optional[Callable[[int, torch.nn.Module], None]] = None) -> int:
    """Train from ``state.step`` until ``settings.n_steps``, the time limit, or an interruption.

    Args:
        net: ``state.model``, or a DistributedDataParallel wrapper around it.
        batches: one batch per remaining step (:func:`trainer.episode_sampler.episode_loader`).
        scalars: where rank 0 logs (None: nowhere).
        step_callback: called with the number of completed steps and the unwrapped model after each step.

    Returns:
        The number of completed steps (the final snapshot is the caller's to write).
    """
    start_step = state.step
    deadline = time.monotonic() + 60 * settings.time_limit_min if settings.time_limit_min > 0 else math.inf
    progress = tqdm(total=settings.n_steps, initial=start_step, disable=not ctx.is_main, desc="train",
                    dynamic_ncols=True)
    try:
        for batch in batches:
            loss, aux = _optimisation_step(state, net, batch, ctx.device, settings)
            step = state.step
            if ctx.is_main:
                progress.update(1)
                if step % settings.log_every == 0 or step == settings.n_steps:
                    logged = _logged_scalars(state, loss, aux)
                    progress.set_postfix({k: f"{v:.3g}" for k, v in logged.items() if k != "lr"})
                    if scalars is not None:
                        scalars.log(logged, step)
            if (step % settings.save_snapshot_every == 0 or step == settings.eval_step) and step < settings.n_steps:
                save_training_state(state, snapshot_dir / step_checkpoint_name(step), ctx)
                if ctx.is_main:
                    prune_snapshots(snapshot_dir, settings.keep_snapshots, settings.eval_step)
            if step_callback is not None:
                step_callback(step, state.model)
            if _time_is_up(deadline, ctx):
                LOGGER.warning("time_limit_min=%s reached after %d of %d steps; the weights so far are saved and "
                               "resume=True continues", settings.time_limit_min, step, settings.n_steps)
                save_training_state(state, snapshot_dir / step_checkpoint_name(step), ctx)
                break
    except KeyboardInterrupt:
        if state.step > start_step:
            LOGGER.warning("interrupted: saving step %d so resume=True continues from it", state.step)
            save_training_state(state, snapshot_dir / step_checkpoint_name(state.step), ctx)
        raise
    finally:
        progress.close()
    return state.step
