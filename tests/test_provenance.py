"""A checkpoint binds its evaluation, results say what made them, recipes keep to their own folders.

One tiny run is trained once (``smoke``, ``fixed`` mode at ``image_size=32``: both differ from the
defaults) and evaluated in the ways a user would.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import training
from config import REPO_ROOT, ConfigError, build_config, resolve_config
from conftest import smoke_updates
from dataloaders.volume_io import image_path, label_path
from test_end_to_end import load_test_script
from util.checkpoints import load_checkpoint

TRAINED = {"model": {"dmap_mode": "fixed", "fixed_threshold": 0.7}, "image_size": 32, "n_steps": 2}


def config(synth_root: Path, log_dir: Path, **updates) -> dict:
    return resolve_config(build_config(["smoke"], smoke_updates(synth_root, log_dir, **updates)))


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory):
    """(log folder, training config, final checkpoint) of the tiny fixed-mode run."""
    log_dir = tmp_path_factory.mktemp("runs")
    cfg = config(synth_root, log_dir, **TRAINED)
    return log_dir, cfg, training.train(cfg)


@pytest.fixture(scope="module")
def test_script():
    return load_test_script()


class Spy:
    """Records the model config and options the evaluation really used."""

    def __init__(self, monkeypatch, module):
        self.model_cfgs, self.options = [], []
        build, evaluate = module.FewShotSeg.from_checkpoint, module.evaluate_fold

        def from_checkpoint(model_cfg, *args, **kwargs):
            self.model_cfgs.append(dict(model_cfg))
            return build(model_cfg, *args, **kwargs)

        def evaluate_fold(model, cases, spec, options, *args, **kwargs):
            self.options.append(options)
            assert model.dmap_mode == self.model_cfgs[-1]["dmap_mode"]
            return evaluate(model, cases, spec, options, *args, **kwargs)

        monkeypatch.setattr(module.FewShotSeg, "from_checkpoint", staticmethod(from_checkpoint))
        monkeypatch.setattr(module, "evaluate_fold", evaluate_fold)


def test_plain_command_line_evaluates_as_trained_and_results_name_their_origin(synth_root, trained, test_script,
                                                                                 tmp_path, monkeypatch):
    _, cfg, final = trained
    spy = Spy(monkeypatch, test_script)
    plain = config(synth_root, tmp_path, reload_model_path=str(final))  # learned, data size: the defaults
    summary, out_dir = test_script.run_test(plain, tmp_path / "results")
    assert spy.model_cfgs[-1]["dmap_mode"] == "fixed" and spy.model_cfgs[-1]["fixed_threshold"] == 0.7
    assert spy.options[-1].image_size == 32

    written = json.loads((out_dir / "results.json").read_text())
    provenance = written["provenance"]
    stored = load_checkpoint(final)
    assert provenance["checkpoint"] == {"path": str(final), "step": 2, "weights": "raw", "training_precision": "fp32",
                                        "sha256": hashlib.sha256(final.read_bytes()).hexdigest()}
    assert provenance["training_config"] == json.loads(json.dumps(stored["config"]))
    evaluation = provenance["evaluation"]
    assert evaluation["model"]["dmap_mode"] == "fixed" and evaluation["image_size"] == 32
    assert evaluation["eval_override"] == {} and evaluation["supp_idx"] == plain["supp_idx"]
    ids = written["test_ids"]
    assert provenance["data"]["volume_ids"] == ids and provenance["data"]["data_dir"] == plain["data_dir"]
    lines = "".join(f"{p.name}  {hashlib.sha256(p.read_bytes()).hexdigest()}\n"
                    for i in ids for p in (image_path(plain["data_dir"], i), label_path(plain["data_dir"], i)))
    assert provenance["data"]["sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    assert provenance["device"] == "cpu" and provenance["precision"] == "fp32" and provenance["wall_seconds"] > 0
    assert provenance["software"]["torch"] == __import__("torch").__version__
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert provenance["code"]["git"]["commit"] == head.stdout.strip()
        assert isinstance(provenance["code"]["git"]["dirty"], bool)
    else:
        assert "git" not in provenance["code"]


def test_git_is_absent_not_guessed_outside_a_checkout(tmp_path):
    from evaluation.provenance import git_state

    assert git_state(tmp_path) is None


def test_eval_override_is_applied_and_recorded(synth_root, trained, test_script, tmp_path, monkeypatch):
    _, _, final = trained
    spy = Spy(monkeypatch, test_script)
    cfg = config(synth_root, tmp_path, reload_model_path=str(final), save_predictions=False,
                 eval_override={"model": {"fixed_threshold": 0.5}})
    summary, _ = test_script.run_test(cfg, tmp_path / "results")
    assert spy.model_cfgs[-1]["fixed_threshold"] == 0.5 and spy.options[-1].image_size == 32
    assert summary["provenance"]["evaluation"]["eval_override"] == {"model": {"fixed_threshold": 0.5}}
    assert summary["provenance"]["evaluation"]["model"]["fixed_threshold"] == 0.5
    assert summary["provenance"]["training_config"]["model"]["fixed_threshold"] == 0.7


def test_the_training_command_line_finds_its_run_and_another_recipe_does_not(synth_root, trained, test_script):
    log_dir, cfg, final = trained
    same = config(synth_root, log_dir, **TRAINED, supp_idx=1, save_predictions=False)
    assert same["run_dir"] == cfg["run_dir"] and test_script.checkpoint_path(same) == final
    plain = config(synth_root, log_dir)
    assert plain["run_dir"] != cfg["run_dir"]
    with pytest.raises(ConfigError) as info:
        test_script.validate_test_inputs(plain)
    assert "no checkpoint at" in str(info.value) and Path(cfg["run_dir"]).name in str(info.value)


def test_a_differing_model_key_stops_the_entry_point_in_one_line(synth_root, trained, tmp_path):
    _, _, final = trained
    env = dict(os.environ, DMAP_DEBUG="0")
    args = [sys.executable, "test.py", "with", "smoke", f"data_root={synth_root}", f"path.log_dir={tmp_path}",
            f"n_sv={smoke_updates(synth_root, tmp_path)['n_sv']}", f"reload_model_path={final}",
            "model.dmap_mode=off"]
    result = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line and "Warning" not in line]
    assert len(lines) == 1 and lines[0].startswith("test: error: ")
    assert "model.dmap_mode: 'fixed' (checkpoint) vs 'off' (command line)" in lines[0]
    assert not any(tmp_path.iterdir())  # refused before Sacred made a run folder


def test_a_folder_holding_another_recipe_is_neither_evaluated_nor_resumed(synth_root, trained, test_script, tmp_path):
    _, _, final = trained
    plain = config(synth_root, tmp_path)
    # the plain recipe's folder holding the fixed-mode weights (copied in, or named under another naming rule)
    legacy = Path(plain["snapshot_dir"])
    legacy.mkdir(parents=True)
    shutil.copy(final, legacy / "final.pth")
    with pytest.raises(ConfigError) as info:
        test_script.validate_test_inputs(plain)
    message = str(info.value)
    assert "\n" not in message and "model.dmap_mode: 'fixed' (checkpoint) vs 'learned' (command line)" in message
    assert "image_size: 32 (checkpoint) vs None (command line)" in message
    for resume in (True, False):
        with pytest.raises(ConfigError) as info:
            training.check_training_inputs(dict(plain, resume=resume))
        assert "holds a run trained with another config" in str(info.value)
        assert "model.dmap_mode: 'fixed' (stored) vs 'learned' (now)" in str(info.value)
    with pytest.raises(ConfigError, match="another config"):
        training.train(dict(plain, resume=True))
    assert sorted(p.name for p in legacy.iterdir()) == ["final.pth"]  # nothing written


def test_resuming_the_same_recipe_is_accepted(synth_root, trained):
    log_dir, cfg, final = trained
    same = config(synth_root, log_dir, **TRAINED, resume=True, num_workers=0, time_limit_min=5)
    training.check_training_inputs(same)  # runtime keys may change on resume
    with pytest.raises(ConfigError, match="eval_override"):
        training.check_training_inputs(dict(same, eval_override={"image_size": 64}))
