"""Atomic checkpoint files: training state, resume and model-weight loading."""
from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from util.atomic_files import atomic_path

FINAL_NAME = "final.pth"
STEP_PREFIX = "step_"
# the model weights a training checkpoint may hold: entry -> the name results give them
WEIGHT_KINDS = {"model": "raw", "model_ema": "averaged"}


def step_checkpoint_name(step: int) -> str:
    """File name of the snapshot taken after ``step`` completed training steps."""
    return f"{STEP_PREFIX}{step:07d}.pth"


def step_snapshots(snapshot_dir: str | os.PathLike) -> list[Path]:
    """The step snapshots of ``snapshot_dir``, oldest first (names carry zero-padded steps, so the name order
    is the step order)."""
    return sorted(Path(snapshot_dir).glob(f"{STEP_PREFIX}*.pth"))


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` with ``torch.save`` atomically.

    The state goes to a temporary file in the destination folder (``util.atomic_files.atomic_path``), is
    flushed to disk, then renamed over ``path``, so an interrupted write never leaves a truncated checkpoint
    behind.
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as exc:
        if _disk_full(exc):
            free = shutil.disk_usage(path.parent).free
            raise OSError(errno.ENOSPC, f"disk full: cannot write checkpoint {path} "
                                        f"({free / 2**20:.0f} MiB free in {path.parent})") from exc
        raise
    return path


def _disk_full(exc: BaseException) -> bool:
    """Whether a failed write ran out of space; torch reports a short write as 'enforce fail ... unexpected
    pos', with the OS's 'No space left on device' only in an earlier message."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, RuntimeError) and ("unexpected pos" in str(exc) or "No space left" in str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or any ``torch.save`` dict).

    Args:
        mmap: map the tensors from the file instead of reading them (cheap when only the stored config,
            step or fold is needed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as exc:  # corrupted file, wrong format
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"could not read checkpoint {path} (not a complete torch.save file?): {first}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def latest_checkpoint(snapshot_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the most completed steps in ``snapshot_dir``, or None when it holds none.

    ``final.pth`` wins over step snapshots of as many steps or fewer. A ``final.pth`` with fewer steps than
    the newest step snapshot is the one a ``time_limit_min`` stop wrote before the resumed run went on
    (and was then interrupted): resuming from it would throw the later steps away.
    """
    snapshot_dir = Path(snapshot_dir)
    if not snapshot_dir.is_dir():
        return None
    steps = step_snapshots(snapshot_dir)
    final = snapshot_dir / FINAL_NAME
    if not final.is_file():
        return steps[-1] if steps else None
    if not steps:
        return final
    final_step = load_checkpoint(final, mmap=True).get("step")
    newest_step = int(steps[-1].stem[len(STEP_PREFIX):])
    return steps[-1] if isinstance(final_step, int) and final_step < newest_step else final


def weights_entry(state: dict[str, Any]) -> str | None:
    """The entry of a checkpoint whose weights :func:`load_model_weights` loads: ``"model"`` (the raw
    weights of the last step), or None for a bare state dict."""
    return "model" if isinstance(state.get("model"), dict) else None


def weights_kind(state: dict[str, Any]) -> str:
    """Which weights an evaluation of ``state`` uses, as results report it: ``"raw"`` or ``"averaged"``
    (:data:`WEIGHT_KINDS`; a bare state dict counts as raw)."""
    return WEIGHT_KINDS.get(weights_entry(state) or "model", "raw")


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike, state: dict[str, Any] | None = None) -> int:
    """Load the model weights of a training checkpoint (or a bare state dict) into ``model``.

    All of the model's tensors must be in the file: a partial model is never loaded silently.

    Args:
        model: the (unwrapped) model.
        path: a file written by training (``{"model": state_dict, ...}``) or a plain state dict.
        state: the file's content when already read with :func:`load_checkpoint` (not read again).

    Returns:
        The number of tensors loaded.

    Raises:
        ValueError: when keys are missing or unexpected, or shapes differ (the file belongs to another
            model configuration), naming the file.
    """
    state = load_checkpoint(path) if state is None else state
    entry = weights_entry(state)
    weights = state[entry] if entry else state
    # checkpoints saved from a DDP-wrapped model carry a "module." prefix
    weights = {k[len("module."):] if k.startswith("module.") else k: v for k, v in weights.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit this model: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); "
            "check model.backbone, model.method (and its components) and model.dmap_mode"
        )
    bad = [k for k, v in weights.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"checkpoint {path} has tensors of the wrong shape, e.g. {bad[0]}: "
                         f"{tuple(weights[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}")
    model.load_state_dict(weights)
    return len(weights)


#: checkpoint key of the exponential moving average of the weights (written when ema_decay > 0)
AVERAGED_KEY = "model_ema"


def select_weights(state: dict[str, Any], choice: str, path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """The weights of a checkpoint that evaluation reads.

    Args:
        state: the checkpoint's content (:func:`load_checkpoint`).
        choice: ``auto`` (the averaged weights when the checkpoint has them, else the raw ones),
            ``averaged`` or ``raw``.
        path: the checkpoint file, named in errors.

    Returns:
        (``{"model": state_dict}`` for :func:`load_model_weights`, ``"averaged"`` or ``"raw"``).

    Raises:
        ValueError: ``averaged`` was asked of a checkpoint without averaged weights, or an unknown choice.
    """
    if choice not in ("auto", "averaged", "raw"):
        raise ValueError(f"config key 'eval_weights' is {choice!r}; expected 'auto', 'averaged' or 'raw'")
    has_averaged = AVERAGED_KEY in state
    if choice == "averaged" and not has_averaged:
        raise ValueError(f"config key 'eval_weights' is 'averaged' but {path} holds no averaged weights "
                         "(trained with ema_decay=0); use eval_weights=raw or auto")
    if has_averaged and choice != "raw":
        return {"model": state[AVERAGED_KEY]}, "averaged"
    return {"model": state.get("model", state)}, "raw"


def capture_rng_state() -> dict[str, Any]:
    """Random states of Python, NumPy and torch (CPU and CUDA), for exact resumption."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
