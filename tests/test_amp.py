"""amp=auto picks bf16 only where it is native; amp=bf16 on a CPU without it is a config error."""
from __future__ import annotations

import pytest
import torch

import training
import util.amp as amp_module
from conftest import smoke_updates
from config import build_config, resolve_config
from util.amp import AmpUnsupported, autocast, resolve_amp

CPU = torch.device("cpu")


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "off")])
def test_auto_follows_native_support(monkeypatch, native, expected):
    monkeypatch.setattr(amp_module, "native_bf16", lambda device: native)
    assert resolve_amp("auto", CPU) == expected
    assert resolve_amp("off", CPU) == "off"


def test_bf16_without_native_support_is_refused_with_advice(monkeypatch):
    monkeypatch.setattr(amp_module, "native_bf16", lambda device: False)
    with pytest.raises(AmpUnsupported, match="amp=auto or amp=off") as info:
        resolve_amp("bf16", CPU)
    assert "100x" in str(info.value) and "\n" not in str(info.value)


def test_native_bf16_is_kept(monkeypatch):
    monkeypatch.setattr(amp_module, "native_bf16", lambda device: True)
    assert resolve_amp("bf16", CPU) == "bf16"


def test_fp16_on_cpu_and_unknown_modes_are_refused():
    with pytest.raises(AmpUnsupported):
        resolve_amp("fp16", CPU)
    with pytest.raises(ValueError, match="'amp'"):
        resolve_amp("fp8", CPU)


def test_autocast_off_is_fp32_and_bf16_casts_matmuls():
    a = torch.ones(2, 2)
    with autocast(CPU, "off"):
        assert (a @ a).dtype == torch.float32
    with autocast(CPU, "bf16"):
        assert (a @ a).dtype == torch.bfloat16


def test_training_refuses_bf16_on_a_cpu_without_it(monkeypatch, synth_root, tmp_path):
    monkeypatch.setattr(amp_module, "native_bf16", lambda device: False)
    cfg = resolve_config(build_config(["smoke"], smoke_updates(synth_root, tmp_path, amp="bf16", n_steps=1)))
    with pytest.raises(AmpUnsupported, match="config key 'amp' is 'bf16'"):
        training.train(cfg)
    assert not list(tmp_path.rglob("*.pth"))  # refused before any step


def test_default_is_auto():
    assert build_config()["amp"] == "auto"
