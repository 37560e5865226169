"""Everything a training run carries from step to step, how it is built, saved and resumed.

A snapshot holds the model, optimiser, learning-rate schedule, loss scaler, step count and every random
generator's state, so a resumed run continues bit for bit where it stopped; it also stores the run's
config and fold (which volumes it trained on), which evaluation checks. With ``ema_decay > 0`` it also
holds the exponential moving average of the weights (``model_ema``, batch-norm buffers included), which
evaluation reads by default.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from models.fewshot import FewShotSeg
from util.checkpoints import (AVERAGED_KEY, capture_rng_state, latest_checkpoint, load_checkpoint, restore_rng_state,
                              save_checkpoint)
from util.distributed import DistributedContext, barrier
from util.lr_schedule import LR_SCHEDULES, build_lr_schedule

LOGGER = logging.getLogger("training")

__all__ = ["LR_SCHEDULES", "EMA_KEY", "OptimSettings", "TrainingState", "build_lr_schedule", "build_training_state",
           "resume_training_state", "save_training_state"]

#: checkpoint key of the averaged weights (a state dict of the same model)
EMA_KEY = AVERAGED_KEY


@dataclass(frozen=True)
class OptimSettings:
    """SGD with momentum, a learning-rate schedule and optional weight averaging.

    Attributes:
        lr, momentum, weight_decay: SGD.
        lr_step_size, lr_gamma: the ``step`` schedule (x ``lr_gamma`` every ``lr_step_size`` steps).
        lr_schedule: ``step`` or ``cosine`` (half a cosine from ``lr`` to ``lr * lr_final_factor`` over
            ``n_steps``).
        n_steps: length of the run (the cosine schedule ends there).
        lr_final_factor: the cosine schedule's last learning rate, as a fraction of ``lr``.
        lr_warmup_steps: linear warm-up from ``lr / warmup`` to ``lr`` over these first steps (either
            schedule; 0: none).
        ema_decay: decay of the exponential moving average of the weights (0: no average).
        ema_warmup: the decay of update n is ``min(ema_decay, (1 + n) / (10 + n))``, so the average forgets the
            initial weights within the first tens of steps instead of carrying ``ema_decay ** t`` of them.
        grad_clip: the gradients' total norm is clipped to this value before each update (0: no clipping).
    """

    lr: float
    momentum: float
    weight_decay: float
    lr_step_size: int
    lr_gamma: float
    lr_schedule: str = "step"
    n_steps: int = 0
    lr_final_factor: float = 0.01
    lr_warmup_steps: int = 0
    ema_decay: float = 0.0
    ema_warmup: bool = True
    grad_clip: float = 0.0


def ema_multi_avg_fn(decay: float, warmup: bool = True) -> Callable[[list, list, torch.Tensor], None]:
    """The update of :class:`torch.optim.swa_utils.AveragedModel` for an exponential moving average.

    ``average <- d * average + (1 - d) * weights`` with ``d = decay`` (as
    :func:`torch.optim.swa_utils.get_ema_multi_avg_fn`) or, with ``warmup``, ``d = min(decay, (1 + n) / (10 + n))``
    for the n-th update after the first (which copies). Without the warm-up an average started from random
    weights still holds ``decay ** t`` of them after t steps (55 % after 600 steps at 0.999). Integer buffers
    (batch-norm step counters) take the model's value.
    """
    if warmup:
        @torch.no_grad()
        def update(averaged: list, current: list, n_averaged: torch.Tensor) -> None:
            n = int(n_averaged)
            d = min(decay, (1.0 + n) / (10.0 + n))
            if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
                torch._foreach_lerp_(averaged, current, 1.0 - d)
            else:
                for avg, cur in zip(averaged, current):
                    avg.copy_(cur)
        return update
    return get_ema_multi_avg_fn(decay)


@dataclass
class TrainingState:
    """The model and what its optimisation needs.

    Attributes:
        model: the unwrapped model (a DDP wrapper, if any, is made around it by the caller).
        amp: the resolved precision (``"off"``, ``"bf16"`` or ``"fp16"``).
        step: completed optimisation steps.
        record: stored with every snapshot (``config``, ``fold``) and never read back by training.
        averaged: the exponential moving average of the model's weights and buffers (None: not kept).
        grad_clip: total gradient norm clipped to this before each update (0: no clipping).
    """

    model: FewShotSeg
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp: str
    step: int = 0
    record: dict[str, Any] = field(default_factory=dict)
    averaged: Optional[AveragedModel] = None
    grad_clip: float = 0.0


def build_training_state(model_cfg: Mapping[str, Any], optim: OptimSettings, amp: str, device: torch.device,
                         seed: int, channels_last: bool = False,
                         record: Optional[dict[str, Any]] = None) -> TrainingState:
    """A fresh state at step 0; ``seed`` fixes the initial weights (identical on every rank).

    Args:
        model_cfg: the ``model`` config sub-dict (:meth:`FewShotSeg.from_config`).
        amp: a resolved precision; ``"fp16"`` enables the gradient scaler.
        channels_last: store activations as [B, H, W, C] in memory (faster convolutions on GPUs).
    """
    torch.manual_seed(seed)
    model = FewShotSeg.from_config(model_cfg).to(device)
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum,
                                weight_decay=optim.weight_decay)
    scheduler = build_lr_schedule(optimizer, optim)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    averaged = None
    if optim.ema_decay > 0:
        # batch-norm running statistics are averaged too, so the averaged model needs no recalibration
        averaged = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(optim.ema_decay, optim.ema_warmup),
                                 use_buffers=True)
    return TrainingState(model, optimizer, scheduler, scaler, amp, 0, dict(record or {}), averaged, optim.grad_clip)


def resume_training_state(state: TrainingState, snapshot_dir: Path, device: torch.device) -> Optional[Path]:
    """Load the newest snapshot of ``snapshot_dir`` into ``state``; returns its path (None: none there)."""
    last = latest_checkpoint(snapshot_dir)
    if last is None:
        return None
    saved = load_checkpoint(last, map_location=device)
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.scaler.load_state_dict(saved["scaler"])
    if state.averaged is not None:
        if EMA_KEY not in saved:
            raise ValueError(f"{last} holds no averaged weights but ema_decay > 0; resume with the run's own "
                             "ema_decay or start a new run folder")
        state.averaged.module.load_state_dict(saved[EMA_KEY])
        state.averaged.n_averaged.fill_(int(saved.get("ema_n_averaged", 1)))
    restore_rng_state(saved["rng"])
    state.step = int(saved["step"])
    return last


def save_training_state(state: TrainingState, path: Path, ctx: DistributedContext) -> None:
    """Write a snapshot of ``state`` (rank 0 only, atomically); every rank waits until it is written."""
    if ctx.is_main:
        content = {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                   "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict(),
                   "step": state.step, "rng": capture_rng_state(), **state.record}
        if state.averaged is not None:
            content[EMA_KEY] = state.averaged.module.state_dict()
            content["ema_n_averaged"] = int(state.averaged.n_averaged)
        save_checkpoint(content, path)
    barrier(ctx)
