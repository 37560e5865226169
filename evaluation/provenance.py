"""What made a result: code, checkpoint, configs, data, software and machine, recorded in ``results.json``.

Every entry is a fact read at evaluation time; what cannot be read is left out rather than guessed (no
``git`` entry outside a git checkout or without the ``git`` program, no ``version`` when the project is
not installed).
"""
from __future__ import annotations

import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from util.checkpoints import weights_kind

__all__ = ["DISTRIBUTION", "git_state", "project_version", "code_record", "sha256_file", "files_digest",
           "checkpoint_record", "data_record", "software_record", "precision_name", "build_provenance"]

DISTRIBUTION = "dmap-fsmis"  # the project's name in setup.py
CHUNK = 1 << 20


def git_state(repo: Path) -> Optional[dict[str, Any]]:
    """``{"commit": <sha>, "dirty": bool}`` of the checkout at ``repo``, or None when git cannot tell.

    ``dirty`` is True when tracked files differ from the commit (untracked files do not count).
    """
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=30)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if status.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def project_version(distribution: str = DISTRIBUTION) -> Optional[str]:
    """The installed version of the project, or None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def code_record(repo: Path) -> dict[str, Any]:
    """The project's name, installed version and git state (:func:`git_state`), each when known."""
    code: dict[str, Any] = {"project": DISTRIBUTION}
    version = project_version()
    if version is not None:
        code["version"] = version
    git = git_state(repo)
    if git is not None:
        code["git"] = git
    return code


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def files_digest(paths: Sequence[str | Path]) -> str:
    """One SHA-256 over the names and contents of ``paths`` in the order given (``name  sha256`` lines), so
    a renamed, changed, added or missing file changes it."""
    lines = "".join(f"{Path(p).name}  {sha256_file(p)}\n" for p in paths)
    return hashlib.sha256(lines.encode()).hexdigest()


def checkpoint_record(path: str | Path, state: Mapping[str, Any], weights: str | None = None) -> dict[str, Any]:
    """Path, completed steps, SHA-256, which weights and the precision it was trained in (when the
    checkpoint says) of the evaluated checkpoint.

    Args:
        weights: ``"raw"`` or ``"averaged"``, as :func:`util.checkpoints.select_weights` chose them (None:
            what :func:`util.checkpoints.weights_kind` says of ``state``).
    """
    record = {"path": str(path), "step": state.get("step"), "sha256": sha256_file(path),
              "weights": weights or weights_kind(dict(state))}
    if state.get("precision") is not None:
        record["training_precision"] = precision_name(str(state["precision"]))
    return record


def data_record(data_dir: str | Path, volume_ids: Sequence[int], files: Sequence[str | Path]) -> dict[str, Any]:
    """The data folder, the evaluated volume ids and a digest (:func:`files_digest`) of the files read."""
    return {"data_dir": str(data_dir), "volume_ids": [int(v) for v in volume_ids],
            "files": [Path(f).name for f in files], "sha256": files_digest(files)}


def software_record() -> dict[str, Any]:
    """Python, torch and numpy versions and the platform."""
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "platform": platform.platform()}


def precision_name(amp: str) -> str:
    """A resolved ``amp`` mode as a precision: ``"off"`` is fp32."""
    return "fp32" if amp == "off" else amp


def build_provenance(repo: Path, checkpoint: dict[str, Any], training_config: Mapping[str, Any],
                     evaluation: Mapping[str, Any], data: dict[str, Any], device: torch.device, amp: str,
                     wall_seconds: float) -> dict[str, Any]:
    """The ``provenance`` block of ``results.json``.

    Args:
        repo: the repository root (for the git commit).
        checkpoint: :func:`checkpoint_record`.
        training_config: the training config stored in the checkpoint.
        evaluation: the evaluation's settings (protocol keys, the model config and image size used, the
            override applied).
        data: :func:`data_record`.
        device: where the model ran.
        amp: the resolved precision of the evaluation.
        wall_seconds: time from reading the checkpoint to the last score.
    """
    return {"code": code_record(repo), "checkpoint": checkpoint, "training_config": dict(training_config),
            "evaluation": dict(evaluation), "data": data, "software": software_record(), "device": str(device),
            "precision": precision_name(amp), "wall_seconds": round(float(wall_seconds), 3)}
