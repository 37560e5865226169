"""Entry points as a user runs them: a refused input is one line on stderr, a non-zero exit, no traceback,
and no Sacred run folder; DMAP_DEBUG=1 brings the traceback back."""
import os
import subprocess
import sys

import pytest

from config import REPO_ROOT, ConfigError, build_config, resolve_config


def run(args, tmp_path, debug=False):
    env = dict(os.environ, DMAP_DEBUG="1" if debug else "0")
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def error_lines(stderr):
    # Sacred and torch may print deprecation warnings while importing; the error itself is one line
    return [line for line in stderr.splitlines() if "error" in line.lower() and "Warning" not in line]


def test_training_with_an_unknown_dataset(tmp_path):
    args = ["training.py", "with", "dataset=LIVER", f"path.log_dir={tmp_path}"]
    result = run(args, tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "config key 'dataset' is 'LIVER'" in lines[0], result.stderr
    assert not any(tmp_path.iterdir())  # no FAILED run folder named after the bad value
    debug = run(args, tmp_path, debug=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_test_without_a_checkpoint(synth_root, tmp_path):
    result = run(["test.py", "with", "smoke", f"data_root={synth_root}", f"path.log_dir={tmp_path}"], tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "no checkpoint at" in lines[0] and "reload_model_path" in lines[0], result.stderr
    assert not any(tmp_path.iterdir())


def test_dataset_names_are_case_insensitive(tmp_path):
    cfg = resolve_config(build_config(["cmr"], {"dataset": "cmr"}), need_data=False)
    assert cfg["dataset"] == "CMR" and "CMR_setting1" in cfg["run_dir"]


def test_device_cuda_without_cuda_is_a_config_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"config key 'device' is 'cuda' but CUDA is not available"):
        resolve_config(build_config([], {"device": "cuda"}), need_data=False)
    with pytest.raises(ConfigError, match=r"config key 'model.min_loaded_fraction'"):
        resolve_config(build_config([], {"model": {"min_loaded_fraction": 2}}), need_data=False)
