"""Train -> checkpoint -> resume -> test -> results files, on tiny synthetic data (the ``smoke`` config)."""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import training
from conftest import smoke_updates
from config import REPO_ROOT, ConfigError, build_config, resolve_config
from dataloaders.dataset_specifics import get_dataset_spec
from util.checkpoints import load_checkpoint


def load_test_script():
    """``test.py`` by path: the module name ``test`` is also a standard-library package."""
    spec = importlib.util.spec_from_file_location("dmap_test_script", REPO_ROOT / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resolved_smoke(synth_root: Path, log_dir: Path, **updates) -> dict:
    """The smoke named config over the defaults, resolved as the Sacred entry point does."""
    return resolve_config(build_config(["smoke"], smoke_updates(synth_root, log_dir, **updates)))


def final_weights(cfg: dict) -> dict[str, torch.Tensor]:
    return load_checkpoint(Path(cfg["snapshot_dir"]) / "final.pth")["model"]


def test_interrupted_run_resumes_to_the_same_weights(synth_root, tmp_path):
    straight = resolved_smoke(synth_root, tmp_path / "straight")
    training.train(straight)

    interrupted = resolved_smoke(synth_root, tmp_path / "interrupted")

    def stop_after_two(step, model):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        training.train(interrupted, step_callback=stop_after_two)
    snapshots = sorted(p.name for p in Path(interrupted["snapshot_dir"]).iterdir())
    assert snapshots == ["step_0000002.pth", "step_0000003.pth"]  # periodic + on interrupt
    assert load_checkpoint(Path(interrupted["snapshot_dir"]) / "step_0000003.pth")["step"] == 3

    training.train(dict(interrupted, resume=True))
    assert load_checkpoint(Path(interrupted["snapshot_dir"]) / "final.pth")["step"] == straight["n_steps"]
    a, b = final_weights(straight), final_weights(interrupted)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_time_limit_stops_cleanly_and_resume_finishes(synth_root, tmp_path):
    cfg = resolved_smoke(synth_root, tmp_path, time_limit_min=1e-6)
    final = training.train(cfg)
    assert load_checkpoint(final)["step"] == 1  # the budget is checked after each step
    final = training.train(dict(cfg, resume=True, time_limit_min=0))
    assert load_checkpoint(final)["step"] == cfg["n_steps"]


class RecordingWriter:
    """Stands in for TensorBoard's ``SummaryWriter`` (not installed here): records what it would write."""

    made: list["RecordingWriter"] = []

    def __init__(self, log_dir: str):
        self.log_dir, self.scalars = log_dir, []
        RecordingWriter.made.append(self)

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.scalars.append((name, value, step))

    def close(self) -> None:
        pass


def test_sacred_train_then_test_writes_results(synth_root, tmp_path, monkeypatch):
    RecordingWriter.made = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=RecordingWriter))
    updates = smoke_updates(synth_root, tmp_path)
    train_run = training.ex.run(named_configs=["smoke"], config_updates=dict(updates, tensorboard=True))
    final = Path(train_run.result)
    assert final.name == "final.pth" and final.is_file()
    run_dir = final.parent.parent
    metrics = json.loads(next((run_dir / "train").glob("*/metrics.json")).read_text())
    assert len(metrics["loss"]["values"]) == 4 and all(np.isfinite(metrics["loss"]["values"]))
    assert {"loss", "lr", "tau", "xi", "kept_fraction", "pred_fg_fraction"} <= set(metrics)
    # TensorBoard gets the same scalars as metrics.json, in the run folder's tensorboard/
    (writer,) = RecordingWriter.made
    assert Path(writer.log_dir) == run_dir / "tensorboard"
    for name, record in metrics.items():
        written = [(step, value) for n, value, step in writer.scalars if n == name]
        assert [step for step, _ in written] == record["steps"], name
        assert [value for _, value in written] == pytest.approx(record["values"]), name
    assert {name for name, _, _ in writer.scalars} == set(metrics)

    test_script = load_test_script()
    test_run = test_script.ex.run(named_configs=["smoke"], config_updates=updates)
    assert 0.0 <= test_run.result <= 1.0
    results_dir = run_dir / "results"
    summary = json.loads((results_dir / "results.json").read_text())
    spec = get_dataset_spec("SYNTH")
    assert set(summary["classes"]) == {spec.label_names[label] for label in spec.test_labels}
    for cls in summary["classes"].values():
        for method in ("model", "copy_support"):
            assert set(cls[method]) == {"dice", "iou", "precision", "recall"}
            assert all(0.0 <= v <= 1.0 for v in cls[method].values())
    csv_lines = (results_dir / "results.csv").read_text().splitlines()
    n_queries = len(summary["test_ids"]) - 1
    assert len(csv_lines) == 1 + 2 * n_queries * len(summary["classes"])

    predictions = sorted((results_dir / "predictions").glob("query_*.nii.gz"))
    assert len(predictions) == n_queries
    query_id = int(predictions[0].name.split("_")[1].split(".")[0])
    image = sitk.ReadImage(str(synth_root / "SYNTH" / f"image_{query_id}.nii.gz"))
    prediction = sitk.ReadImage(str(predictions[0]))
    assert prediction.GetSize() == image.GetSize()
    assert np.allclose(prediction.GetSpacing(), image.GetSpacing())
    assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, *spec.test_labels}
    assert list((results_dir / "overlays").glob("*.png"))
    assert list((run_dir / "test").glob("*/results.json"))  # also stored as a Sacred artifact


def test_config_errors_are_one_line_and_name_the_key(synth_root, tmp_path):
    base = build_config(["smoke"], {"data_root": str(synth_root), "path": {"log_dir": str(tmp_path)}})
    cases = [
        ({"dataset": "LIVER"}, "'dataset'"),
        ({"eval_fold": 7}, "'eval_fold'"),
        ({"test_label": [9]}, "test_label"),
        ({"model": dict(base["model"], dmap_mode="sometimes")}, "model.dmap_mode"),
        ({"data_root": str(tmp_path / "nowhere")}, "data_root"),
        ({"amp": "fp8"}, "'amp'"),
    ]
    for update, key in cases:
        with pytest.raises(ConfigError, match=key) as info:
            resolve_config(dict(base, **update))
        assert "\n" not in str(info.value)
