"""Mixed precision: which autocast dtype a device should use, and the autocast context itself.

``amp="auto"`` picks bf16 only where the hardware computes it natively (a CUDA GPU with bf16 support, or a
CPU on which oneDNN reports native bf16, e.g. AVX-512 BF16 / AMX); elsewhere it stays in fp32. On a CPU
without native bf16 (AVX2 only), bf16 convolutions are emulated and were measured about 100x slower than
fp32, so an explicit ``amp=bf16`` there is refused rather than run.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

AMP_MODES = ("auto", "off", "bf16", "fp16")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class AmpUnsupported(ValueError):
    """The requested precision cannot run efficiently on this device."""


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_amp(mode: str, device: torch.device) -> str:
    """The concrete precision (``"off"``, ``"bf16"`` or ``"fp16"``) for config value ``mode`` on ``device``.

    Raises:
        ValueError: unknown mode.
        AmpUnsupported: bf16 asked for on a device without native bf16, or fp16 on a CPU.
    """
    if mode not in AMP_MODES:
        raise ValueError(f"config key 'amp' is {mode!r}; expected one of {AMP_MODES}")
    if mode == "auto":
        return "bf16" if native_bf16(device) else "off"
    if mode == "bf16" and not native_bf16(device):
        what = "this CPU has no native bf16 (oneDNN reports none, e.g. AVX2 only): bf16 convolutions " \
               "would run about 100x slower than fp32" if device.type == "cpu" else f"{device} has no bf16 support"
        raise AmpUnsupported(f"config key 'amp' is 'bf16' but {what}; use amp=auto or amp=off")
    if mode == "fp16" and device.type == "cpu":
        raise AmpUnsupported("config key 'amp' is 'fp16', which CPUs do not run natively; use amp=auto or amp=off")
    return mode


def autocast(device: torch.device, amp: str) -> ContextManager:
    """Autocast for a resolved ``amp`` (``"off"`` -> a no-op context)."""
    if amp in AMP_DTYPES:
        return torch.autocast(device.type, dtype=AMP_DTYPES[amp])
    return contextlib.nullcontext()
