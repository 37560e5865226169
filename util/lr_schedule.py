"""Learning-rate schedules of a training run, stepped once per optimisation step."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the settings live with the training state; only their fields are read here
    from trainer.state import OptimSettings

__all__ = ["LR_SCHEDULES", "build_lr_schedule"]

#: learning-rate schedules: "step" (x lr_gamma every lr_step_size steps, the paper's) or "cosine" (from lr
#: down to lr * lr_final_factor at the last step)
LR_SCHEDULES = ("step", "cosine")


def build_lr_schedule(optimizer: torch.optim.Optimizer, optim: "OptimSettings") -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of ``optim`` (stepped once per optimisation step).

    ``step``: ``lr * lr_gamma ** (t // lr_step_size)``; ``cosine``: ``lr * (f + (1 - f) (1 + cos(pi t / T)) / 2)``
    with ``f = lr_final_factor`` and ``T = n_steps - lr_warmup_steps``; a warm-up multiplies the first
    ``lr_warmup_steps`` steps by ``(t + 1) / lr_warmup_steps``.
    """
    if optim.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {optim.lr_schedule!r}")
    warmup = optim.lr_warmup_steps
    if optim.lr_schedule == "step":
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=optim.lr_step_size, gamma=optim.lr_gamma)
    else:
        if optim.n_steps <= warmup:
            raise ValueError(f"the cosine schedule needs n_steps ({optim.n_steps}) > lr_warmup_steps ({warmup})")
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=optim.n_steps - warmup,
                                                          eta_min=optim.lr * optim.lr_final_factor)
    if warmup <= 0:
        return main
    ramp = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / warmup))
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
