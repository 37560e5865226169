"""Atomic checkpoints, snapshot discovery and strict weight loading."""
import os

import numpy as np
import pytest
import torch

from util.checkpoints import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    restore_rng_state,
    save_checkpoint,
    step_checkpoint_name,
)


def test_save_is_atomic_and_round_trips(tmp_path, monkeypatch):
    path = tmp_path / "snap" / "a.pth"
    save_checkpoint({"step": 3, "w": torch.arange(4)}, path)
    assert load_checkpoint(path)["step"] == 3

    # a failure while writing leaves the previous file intact and no temporary behind
    def broken_save(obj, handle):
        handle.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError):
        save_checkpoint({"step": 4}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 3
    assert os.listdir(path.parent) == ["a.pth"]


def test_latest_checkpoint_prefers_final_then_highest_step(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in (2, 10, 4):
        save_checkpoint({"step": step}, tmp_path / step_checkpoint_name(step))
    assert latest_checkpoint(tmp_path).name == step_checkpoint_name(10)
    save_checkpoint({"step": 12}, tmp_path / "final.pth")
    assert latest_checkpoint(tmp_path).name == "final.pth"
    save_checkpoint({"step": 10}, tmp_path / "final.pth")  # as many steps as the newest snapshot: final
    assert latest_checkpoint(tmp_path).name == "final.pth"


def test_latest_checkpoint_skips_a_final_left_by_an_earlier_time_limit_stop(tmp_path):
    # a time-limited stop at step 5 wrote step 5 and final; the resumed run saved step 10, then was killed
    save_checkpoint({"step": 5}, tmp_path / step_checkpoint_name(5))
    save_checkpoint({"step": 5}, tmp_path / "final.pth")
    save_checkpoint({"step": 10}, tmp_path / step_checkpoint_name(10))
    assert latest_checkpoint(tmp_path).name == step_checkpoint_name(10)
    save_checkpoint({"step": 3600}, tmp_path / "final.pth")
    assert latest_checkpoint(tmp_path).name == "final.pth"


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        load_checkpoint(bad)


def test_load_model_weights_is_strict(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    path = tmp_path / "m.pth"
    save_checkpoint({"model": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    other = torch.nn.Sequential(torch.nn.Linear(3, 2))
    assert load_model_weights(other, path) == 2
    assert torch.equal(other[0].weight, model[0].weight)

    save_checkpoint({"model": {"something.else": torch.zeros(1)}}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth.*missing keys"):
        load_model_weights(other, tmp_path / "wrong.pth")
    save_checkpoint({"model": {"0.weight": torch.zeros(5, 3), "0.bias": torch.zeros(2)}}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="wrong shape"):
        load_model_weights(other, tmp_path / "shape.pth")


def test_rng_state_round_trip():
    state = capture_rng_state()
    first = (np.random.rand(), torch.rand(1).item())
    restore_rng_state(state)
    assert (np.random.rand(), torch.rand(1).item()) == first


def test_disk_full_says_so(tmp_path, monkeypatch):
    import errno

    def short_write(obj, handle):  # what torch raises when the disk fills during torch.save
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed / unexpected pos 64 vs 4096")

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(OSError, match=r"disk full: cannot write checkpoint .*a.pth \(\d+ MiB free") as info:
        save_checkpoint({"step": 1}, tmp_path / "a.pth")
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


def test_a_partial_model_checkpoint_is_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    weights = model.state_dict()
    del weights["1.bias"]  # one tensor short
    save_checkpoint({"model": weights}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial.pth does not fit this model: 1 missing keys"):
        load_model_weights(model, tmp_path / "partial.pth")
