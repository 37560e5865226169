"""Training scalars: the same names and values reach Sacred's metrics.json and TensorBoard (a stand-in writer
here; the ``tensorboard`` package is not needed), and training goes on without TensorBoard."""
from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from trainer.loop import LOGGED_AUX, _logged_scalars
from util.logger import ScalarLogger

REPO = Path(__file__).resolve().parents[1]
#: what docs/training.md ("Watching training: TensorBoard") lists
DOCUMENTED = ("loss", "lr", "tau", "xi", "kept_fraction", "pred_fg_fraction", "true_fg_fraction", "align_loss",
              "threshold")


class FakeSacredRun:
    def __init__(self):
        self.scalars: list[tuple[str, float, int]] = []

    def log_scalar(self, name: str, value: float, step: int) -> None:
        self.scalars.append((name, value, step))


class FakeSummaryWriter:
    """Records what :class:`torch.utils.tensorboard.SummaryWriter` would write."""

    made: list["FakeSummaryWriter"] = []

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False
        FakeSummaryWriter.made.append(self)

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.scalars.append((name, value, step))

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_tensorboard(monkeypatch):
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeSummaryWriter
    FakeSummaryWriter.made = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    return FakeSummaryWriter


def training_scalars() -> dict[str, float]:
    """What one logged step of a DMAP run gives: loss, learning rate and the batch means of the aux outputs."""
    state = types.SimpleNamespace(optimizer=types.SimpleNamespace(param_groups=[{"lr": 1e-3}]))
    aux = {"tau": torch.tensor([-2.0, -4.0]), "xi": torch.tensor([0.5, 0.7]), "kept_fraction": torch.tensor([0.8]),
           "pred_fg_fraction": torch.tensor(0.1), "true_fg_fraction": torch.tensor(0.2),
           "log_probs": torch.zeros(2, 2)}  # not a scalar: not logged
    return _logged_scalars(state, torch.tensor(0.25), aux)


def test_a_training_step_logs_the_curves_of_the_ablation_pictures():
    logged = training_scalars()
    assert logged == pytest.approx({"loss": 0.25, "lr": 1e-3, "tau": -3.0, "xi": 0.6, "kept_fraction": 0.8,
                                    "pred_fg_fraction": 0.1, "true_fg_fraction": 0.2})
    spec = importlib.util.spec_from_file_location("ablation_report", REPO / "script" / "ablation_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert {name for name, _ in report.CURVES} - {"offset"} <= set(logged)
    # the offset curve reads a logged scalar too: tau here (ADNet's threshold where it has one)
    assert report.offset_series({k: ([1], [v]) for k, v in logged.items()}) == ([1], [-3.0])
    assert set(DOCUMENTED) == {"loss", "lr", *LOGGED_AUX}


def test_scalars_reach_sacred_and_tensorboard_alike(fake_tensorboard, tmp_path):
    sacred = FakeSacredRun()
    logger = ScalarLogger(sacred, tmp_path / "tensorboard")
    logged = training_scalars()
    logger.log(logged, 20)
    logger.log({"loss": 0.5}, 40)
    logger.close()
    (writer,) = fake_tensorboard.made
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.closed
    assert writer.scalars == sacred.scalars
    assert [name for name, _, step in writer.scalars if step == 20] == list(logged)
    assert writer.scalars[-1] == ("loss", 0.5, 40)


def test_without_tensorboard_the_scalars_still_reach_sacred(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    sacred = FakeSacredRun()
    with caplog.at_level(logging.INFO, logger="util.logger"):
        logger = ScalarLogger(sacred, tmp_path / "tensorboard")
    assert logger.writer is None and "tensorboard is not installed" in caplog.text
    logger.log({"loss": 1.0, "xi": 0.5}, 3)
    logger.close()
    assert sacred.scalars == [("loss", 1.0, 3), ("xi", 0.5, 3)]
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_off_makes_no_writer(fake_tensorboard, tmp_path):
    logger = ScalarLogger(FakeSacredRun(), None)
    logger.log({"loss": 1.0}, 1)
    assert logger.writer is None and fake_tensorboard.made == []


def test_snapshot_dice_goes_to_the_run_tensorboard_at_the_checkpoint_step(fake_tensorboard, tmp_path):
    spec = importlib.util.spec_from_file_location("evaluate_snapshots", REPO / "script" / "evaluate_snapshots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    board = ScalarLogger(None, tmp_path / "tensorboard")
    module.log_dice(board, {"mean": {"model": {"dice": 0.6}}, "provenance": {"checkpoint": {"step": 600}}})
    module.log_dice(board, {"mean": {"model": {"dice": 0.5}}, "provenance": {"checkpoint": {"step": 600}}}, "_raw")
    module.log_dice(board, {"mean": {"model": {"dice": 0.4}}})  # no step recorded: nothing written
    module.log_dice(None, {"mean": {"model": {"dice": 0.4}}, "provenance": {"checkpoint": {"step": 1}}})
    assert fake_tensorboard.made[0].scalars == [("eval/dice", 0.6, 600), ("eval_raw/dice", 0.5, 600)]
