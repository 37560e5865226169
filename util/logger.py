"""Scalar logging to Sacred (``metrics.json``) and, when installed, TensorBoard."""
from __future__ import annotations

import logging
import os
from typing import Any, Protocol

LOGGER = logging.getLogger(__name__)


class ScalarSink(Protocol):
    def log_scalar(self, name: str, value: float, step: int) -> None: ...


class ScalarLogger:
    """Fan scalars out to a Sacred run (anything with ``log_scalar``) and an optional TensorBoard writer.

    Args:
        sacred_run: the Sacred ``_run`` (or None).
        tensorboard_dir: folder for TensorBoard event files; None disables TensorBoard. When the
            ``tensorboard`` package is missing this logs one notice and carries on without it.
    """

    def __init__(self, sacred_run: ScalarSink | None = None, tensorboard_dir: str | os.PathLike | None = None):
        self.sacred_run = sacred_run
        self.writer: Any = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                LOGGER.info("tensorboard is not installed; scalars go to Sacred's metrics.json only")
            else:
                self.writer = SummaryWriter(log_dir=str(tensorboard_dir))

    def log(self, scalars: dict[str, float], step: int) -> None:
        """Record each ``name: value`` at ``step``."""
        for name, value in scalars.items():
            value = float(value)
            if self.sacred_run is not None:
                self.sacred_run.log_scalar(name, value, step)
            if self.writer is not None:
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
