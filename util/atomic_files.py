"""Atomic file writes: a file is either the old one or the complete new one, never half written.

A writer writes to a temporary file in the destination folder, which is then renamed onto the destination
with ``os.replace`` (atomic within one file system). The temporary is named
``.<stem>.tmp<pid><suffixes>``, e.g. ``.superpix-MIDDLE_3.tmp4242.nii.gz`` for ``superpix-MIDDLE_3.nii.gz``:
hidden, with the destination's suffixes (writers such as SimpleITK pick the format by extension), and with
the writer's process id, so that :func:`stale_temporaries` can tell the leftovers of a killed run from a
file that a live process is writing right now.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

__all__ = ["TMP_MARK", "atomic_path", "atomic_write_text", "temporary_path", "stale_temporaries"]

TMP_MARK = ".tmp"  # between the stem and the writer's pid in a temporary's name
_TEMPORARY_RE = re.compile(r"^\.(?P<stem>.+)" + re.escape(TMP_MARK) + r"(?P<pid>\d+)(?P<suffix>(\.[^.]*)*)$")


def _split_name(name: str) -> tuple[str, str]:
    """(stem, suffixes) of a file name: ``superpix-MIDDLE_3.nii.gz`` -> (``superpix-MIDDLE_3``, ``.nii.gz``)."""
    suffix = "".join(Path(name).suffixes)
    return name[: len(name) - len(suffix)], suffix


def temporary_path(path: str | os.PathLike) -> Path:
    """The temporary that this process writes before renaming it onto ``path``.

    One name per (destination, process): a process writes a given destination from one place at a time.
    """
    path = Path(path)
    stem, suffix = _split_name(path.name)
    return path.with_name(f".{stem}{TMP_MARK}{os.getpid()}{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in path's folder for the caller to write, then move it onto ``path``.

    The temporary keeps the destination's suffixes (e.g. ``.nii.gz``), so writers that pick a format by
    extension work. On normal exit it is renamed onto ``path`` with ``os.replace`` (the folder is created
    first); on an exception (``KeyboardInterrupt`` included) it is deleted and the exception re-raised,
    leaving any earlier ``path`` untouched.

    Args:
        path: The destination file.

    Yields:
        The temporary path (not yet created).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_path`); returns ``path`` as a Path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def stale_temporaries(folder: str | os.PathLike, name_glob: str = "*") -> list[Path]:
    """Temporaries in ``folder`` left by processes that are gone (a killed run), sorted by name.

    Args:
        folder: The folder to look in.
        name_glob: Glob on the destination names (``superpix-MIDDLE_*.nii.gz``): only their temporaries.

    Returns:
        Paths of the matching temporaries whose writer is no longer running, or whose name carries no
        process id; those of live processes (another run writing into the same folder right now) are
        left out.
    """
    stem_glob, suffix = _split_name(name_glob)
    stale = []
    for tmp in sorted(Path(folder).glob(f".{stem_glob}{TMP_MARK}*{suffix}")):
        match = _TEMPORARY_RE.match(tmp.name)
        if match is None or not _alive(int(match["pid"])):
            stale.append(tmp)
    return stale


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OverflowError:  # not a pid this system can have
        return False
    return True
