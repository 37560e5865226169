"""Everything a training run carries from step to step, how it is built, saved and resumed.

A snapshot holds the model, optimiser, learning-rate schedule, loss scaler, step count and every random
generator's state, so a resumed run continues bit for bit where it stopped; it also stores the run's
config and fold (which volumes it trained on), which evaluation checks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from models.fewshot import FewShotSeg
from util.checkpoints import capture_rng_state, latest_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint
from util.distributed import DistributedContext, barrier

LOGGER = logging.getLogger("training")

__all__ = ["OptimSettings", "TrainingState", "build_training_state", "resume_training_state", "save_training_state"]


@dataclass(frozen=True)
class OptimSettings:
    """SGD with momentum and a step learning-rate schedule (multiplied by ``lr_gamma`` every
    ``lr_step_size`` steps)."""

    lr: float
    momentum: float
    weight_decay: float
    lr_step_size: int
    lr_gamma: float


@dataclass
class TrainingState:
    """The model and what its optimisation needs.

    Attributes:
        model: the unwrapped model (a DDP wrapper, if any, is made around it by the caller).
        amp: the resolved precision (``"off"``, ``"bf16"`` or ``"fp16"``).
        step: completed optimisation steps.
        record: stored with every snapshot (``config``, ``fold``) and never read back by training.
    """

    model: FewShotSeg
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp: str
    step: int = 0
    record: dict[str, Any] = field(default_factory=dict)


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
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=optim.lr_step_size, gamma=optim.lr_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    return TrainingState(model, optimizer, scheduler, scaler, amp, 0, dict(record or {}))


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
    restore_rng_state(saved["rng"])
    state.step = int(saved["step"])
    return last


def save_training_state(state: TrainingState, path: Path, ctx: DistributedContext) -> None:
    """Write a snapshot of ``state`` (rank 0 only, atomically); every rank waits until it is written."""
    if ctx.is_main:
        save_checkpoint({"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                         "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict(),
                         "step": state.step, "rng": capture_rng_state(), **state.record}, path)
    barrier(ctx)
