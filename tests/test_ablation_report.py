"""script/ablation_report.py on hand-made run folders: every number of the table computed by hand."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """A module of script/ by path (script/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "script" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_report():
    return load_script("ablation_report")


def write_run(root: Path, fold: int, mode: str, model: dict, copy: dict, snapshots: dict, final_step: int,
              xi: float) -> None:
    run = root / f"CHAOST2_setting1_fold{fold}_{mode}"
    classes = {name: {"model": {"dice": model[name], "precision": 0.0, "recall": 0.0},
                      "copy_support": {"dice": copy[name]}} for name in model}
    mean = sum(model.values()) / len(model)
    copy_mean = sum(copy.values()) / len(copy)
    summary = {"classes": classes, "supports": [{"support_id": 3}],
               "mean": {"model": {"dice": mean, "precision": 0.25, "recall": 0.75}, "copy_support": {"dice": copy_mean}}}
    (run / "results").mkdir(parents=True)
    (run / "results" / "results.json").write_text(json.dumps(summary))
    for step, dice in snapshots.items():
        out = run / "snapshot_results" / f"step_{step:07d}"
        out.mkdir(parents=True)
        out.joinpath("results.json").write_text(json.dumps({"mean": {"model": {"dice": dice}}}))
    (run / "train" / "1").mkdir(parents=True)
    steps = list(range(10, final_step + 1, 10))
    metrics = {"loss": {"steps": steps, "values": [1.0 / s for s in steps]},
               "xi": {"steps": steps, "values": [xi] * len(steps)},
               "kept_fraction": {"steps": steps, "values": [0.5] * len(steps)}}
    (run / "train" / "1" / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture()
def ablation(tmp_path):
    copy0 = {"liver": 0.5, "spleen": 0.3}
    write_run(tmp_path, 0, "learned", {"liver": 0.6, "spleen": 0.4}, copy0, {100: 0.2, 200: 0.3}, 300, 0.4)
    write_run(tmp_path, 0, "fixed", {"liver": 0.7, "spleen": 0.5}, copy0, {100: 0.1}, 300, 0.9)
    write_run(tmp_path, 1, "learned", {"liver": 0.8, "spleen": 0.6}, {"liver": 0.6, "spleen": 0.2},
              {100: 0.4, 200: 0.1}, 300, 0.4)
    (tmp_path / "CHAOST2_setting1_fold3_learned" / "snapshots").mkdir(parents=True)  # unfinished: left out
    return tmp_path


def test_table_rows_are_the_hand_computed_values(ablation):
    report = load_report()
    header, rows = report.table_rows(report.collect(ablation))
    assert header == ["fold", "arm", "steps", "liver", "spleen", "mean", "mean of last 3 checkpoints",
                      "precision", "recall"]
    approx = pytest.approx
    assert rows[0] == [0, "learned", 300, 0.6, 0.4, approx(0.5), approx((0.2 + 0.3 + 0.5) / 3), 0.25, 0.75]
    assert rows[1] == [0, "fixed", 300, 0.7, 0.5, approx(0.6), "", 0.25, 0.75]  # only 2 checkpoints
    assert rows[2] == [0, "copy-the-support", "", 0.5, 0.3, approx(0.4), "", "", ""]
    assert rows[3] == [1, "learned", 300, 0.8, 0.6, approx(0.7), approx((0.4 + 0.1 + 0.7) / 3), 0.25, 0.75]
    assert rows[4] == [1, "copy-the-support", "", 0.6, 0.2, approx(0.4), "", "", ""]
    # means over the folds an arm has: learned over folds 0 and 1, fixed has one fold (no row)
    assert rows[5] == ["mean of 2 folds (0 1)", "learned", "", approx(0.7), approx(0.5), approx(0.6), "", "", ""]
    assert rows[6] == ["mean of 2 folds (0 1)", "copy-the-support", "", approx(0.55), approx(0.25), approx(0.4),
                       "", "", ""]
    assert len(rows) == 7


def test_cli_writes_markdown_csv_and_pictures(ablation, capsys):
    report = load_report()
    assert report.main([str(ablation)]) == 0
    assert "| 0 | learned | 300 | 0.600 | 0.400 | 0.500 | 0.333 |" in (ablation / "ablation.md").read_text()
    with open(ablation / "ablation.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[1][:6] == ["0", "learned", "300", "0.6000", "0.4000", "0.5000"]
    by_step = (ablation / "dice_by_step.md").read_text()
    assert "| fold 0 learned | raw | 0.500 | 0.333 | 0.200 | +0.167 |" in by_step
    assert "| fold 0 learned | 100 | 0.200, raw | - |" in by_step  # the snapshot results record no recall
    assert "| fold 0 learned | 300 | 0.500 (recall 0.75), raw | - |" in by_step  # the final results do
    for name in ("curves_fold0.png", "curves_fold1.png", "dice_vs_step.png"):
        assert (ablation / name).read_bytes()[:4] == b"\x89PNG"


def test_folder_without_evaluated_runs_is_one_line_error(tmp_path, capsys):
    report = load_report()
    assert report.main([str(tmp_path), "--no-plots"]) == 2
    assert "no evaluated run" in capsys.readouterr().err


def test_with_words_parse_like_sacred():
    module = load_script("evaluate_snapshots")
    named, updates = module.parse_with_arguments(["cpu", "model.dmap_mode=off", "test_label=[1,2]", "data_root=data/x",
                                                  "n_steps=30"])
    assert named == ["cpu"]
    assert updates == {"model": {"dmap_mode": "off"}, "test_label": [1, 2], "data_root": "data/x", "n_steps": 30}


class _StubTest:
    """Stands in for test.py: records which checkpoint each evaluation read, with which weights."""

    def __init__(self):
        self.calls = []

    def run_test(self, cfg, out_dir):
        import hashlib

        checkpoint = Path(cfg["reload_model_path"])
        self.calls.append((checkpoint.name, cfg["eval_weights"], Path(out_dir).name))
        weights = "averaged" if cfg["eval_weights"] == "auto" else cfg["eval_weights"]
        summary = {"mean": {"model": {"dice": 0.5}}, "weights": weights,
                   "provenance": {"checkpoint": {"sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}}}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "results.json").write_text(json.dumps(summary))
        return summary, Path(out_dir)


@pytest.mark.parametrize("last,expected", [(None, ["step_0000600.pth", "step_0001200.pth", "step_0001800.pth",
                                                   "step_0002400.pth", "step_0003000.pth"]),
                                           (2, ["step_0002400.pth", "step_0003000.pth"]),
                                           (0, [])])
def test_evaluate_snapshots_last_takes_the_latest_steps_and_always_the_final_weights(tmp_path, last, expected):
    module = load_script("evaluate_snapshots")
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    # created out of step order; 600 sorts after 3000 as an unpadded name would
    for step in (3000, 600, 2400, 1200, 1800):
        (snapshots / f"step_{step:07d}.pth").write_bytes(b"")
    (snapshots / "final.pth").write_bytes(b"")
    stub = _StubTest()
    module.evaluate_all(stub, {"eval_weights": "auto"}, tmp_path, snapshots / "final.pth", None, True, last)
    averaged = [name for name, weights, _ in stub.calls if weights == "auto"]
    raw = [name for name, weights, _ in stub.calls if weights == "raw"]
    assert averaged == expected + ["final.pth"]
    assert raw == expected + ["final.pth"]
    assert stub.calls[-1] == ("final.pth", "auto", "results")


def test_evaluate_snapshots_rerun_evaluates_only_what_changed(tmp_path):
    module = load_script("evaluate_snapshots")
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    (snapshots / "step_0000600.pth").write_bytes(b"600")
    final = snapshots / "final.pth"
    final.write_bytes(b"weights at step 1000")
    first = _StubTest()
    module.evaluate_all(first, {"eval_weights": "auto"}, tmp_path, final, None, True)
    assert len(first.calls) == 4  # snapshot and final, averaged and raw

    again = _StubTest()
    summary, out_dir = module.evaluate_all(again, {"eval_weights": "auto"}, tmp_path, final, None, True)
    assert again.calls == [] and out_dir == tmp_path / "results" and summary["weights"] == "averaged"

    final.write_bytes(b"weights at step 1200, after resuming")  # another file: its results are stale
    resumed = _StubTest()
    module.evaluate_all(resumed, {"eval_weights": "auto"}, tmp_path, final, None, True)
    assert resumed.calls == [("final.pth", "raw", "results_raw"), ("final.pth", "auto", "results")]

    asked_raw = _StubTest()  # results of the averaged weights do not stand for the raw ones
    module.evaluate_all(asked_raw, {"eval_weights": "raw"}, tmp_path, final, None, False)
    assert asked_raw.calls == [("final.pth", "raw", "results")]


@pytest.mark.slow
def test_ablation_script_trains_evaluates_and_reports(synth_root, tmp_path):
    import os
    import subprocess
    import sys

    from config import build_config, run_dir
    from conftest import smoke_updates

    n_sv = smoke_updates(synth_root, tmp_path)["n_sv"]
    # the script's python is this test's interpreter, whether or not a virtual environment is activated
    env = {**os.environ, "DATASET": "SYNTH", "DATA_ROOT": str(synth_root), "LOG_DIR": str(tmp_path),
           "ARMS": "0:learned:1 0:off:1", "PYTHON": sys.executable}  # fold:mode:seed
    words = ["smoke", f"n_sv={n_sv}", "n_steps=2", "save_snapshot_every=1"]
    # a generous limit: on a shared 2-core machine under load the script has taken over 9 minutes
    done = subprocess.run(["bash", str(REPO / "script" / "ablation.sh"), *words], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "ablation.md").read_text()
    assert "| 0 | learned | 1 | 2 |" in table and "| 0 | off | 1 | 2 |" in table and "copy-the-support" in table
    assert "| learned - off |" in (tmp_path / "summary.md").read_text()
    learned = run_dir(build_config(["smoke"], {"dataset": "SYNTH", "n_sv": n_sv, "n_steps": 2, "seed": 1,
                                               "tag": "seed1", "path": {"log_dir": str(tmp_path)}}))
    assert learned.name.startswith("SYNTH_setting1_fold0_learned_") and learned.name.endswith("_seed1")
    assert (learned / "snapshot_results" / "step_0000001" / "results.json").is_file()
    results = json.loads((learned / "results" / "results.json").read_text())
    assert results["weights"] == "raw" and results["provenance"]["checkpoint"]["weights"] == "raw"  # no average


@pytest.mark.slow
def test_ablation_script_time_limit_saves_the_first_arm_and_leaves_the_rest(synth_root, tmp_path):
    import os
    import subprocess
    import sys

    from config import build_config, run_dir
    from conftest import smoke_updates

    n_sv = smoke_updates(synth_root, tmp_path)["n_sv"]
    # Independent of machine speed: no machine does 10^6 smoke steps in 3 s, so the first arm is always
    # stopped; its loop runs until its own deadline, which is after the sweep's, so the second never starts.
    env = {**os.environ, "DATASET": "SYNTH", "DATA_ROOT": str(synth_root), "LOG_DIR": str(tmp_path),
           "ARMS": "0:learned:1 0:off:1", "PYTHON": sys.executable, "TIME_LIMIT_MIN": "0.05"}  # 3 s
    n_steps = 1_000_000
    words = ["smoke", f"n_sv={n_sv}", f"n_steps={n_steps}", f"save_snapshot_every={n_steps}"]
    done = subprocess.run(["bash", str(REPO / "script" / "ablation.sh"), *words], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SYNTH_setting1_fold0_learned_seed1: stopped by TIME_LIMIT_MIN" in done.stdout
    assert "SYNTH_setting1_fold0_off_seed1: not started, TIME_LIMIT_MIN is spent" in done.stdout
    assert "2 arm(s) unfinished" in done.stdout
    learned = run_dir(build_config(["smoke"], {"dataset": "SYNTH", "n_sv": n_sv, "n_steps": n_steps, "seed": 1,
                                               "tag": "seed1", "path": {"log_dir": str(tmp_path)}}))
    assert len(list((learned / "snapshots").glob("step_*.pth"))) == 1  # the time limit's save, resumable
    assert not (learned / "results").exists()  # a stopped arm is not evaluated
    assert (tmp_path / "logs" / "unfinished").read_text().split() == [
        "SYNTH_setting1_fold0_learned_seed1", "SYNTH_setting1_fold0_off_seed1"]


def test_ablation_script_refuses_a_time_limit_that_is_not_a_positive_number(tmp_path):
    import os
    import subprocess

    env = {**os.environ, "LOG_DIR": str(tmp_path), "ARMS": "0:learned", "TIME_LIMIT_MIN": "soon"}
    done = subprocess.run(["bash", str(REPO / "script" / "ablation.sh"), "cpu"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "TIME_LIMIT_MIN is 'soon'" in done.stderr


def _record(mode: str, fold: int, seed, mean: float, organs=(0.0, 0.0)) -> dict:
    return {"mode": mode, "fold": fold, "seed": seed, "mean": mean, "classes": ["liver", "spleen"],
            "model": {"liver": organs[0], "spleen": organs[1]}, "copy": {"liver": 0.1 * fold, "spleen": 0.2},
            "copy_mean": 0.1 * fold + 0.1}


def test_paired_differences_match_fold_and_seed_and_average_the_pairs():
    report = load_report()
    records = [_record("learned", 0, 1, 0.60), _record("learned", 0, 2, 0.50), _record("learned", 1, 1, 0.70),
               _record("off", 0, 1, 0.55), _record("off", 0, 2, 0.58), _record("off", 1, 1, 0.40),
               _record("off", 2, 1, 0.99)]  # fold 2 has no learned run: no pair
    result = report.paired_differences(records, "learned", "off")
    assert result["n"] == 3
    assert [(f, s) for f, s, _ in result["pairs"]] == [(0, 1), (0, 2), (1, 1)]
    diffs = [0.60 - 0.55, 0.50 - 0.58, 0.70 - 0.40]
    assert [d for _, _, d in result["pairs"]] == pytest.approx(diffs)
    assert result["mean"] == pytest.approx(sum(diffs) / 3)  # the mean, not the median (0.05)
    low, high = result["ci"]
    # a percentile bootstrap of the mean lies within the range of the differences and around their mean
    assert min(diffs) <= low < result["mean"] < high <= max(diffs)
    assert report.paired_differences(records, "learned", "fixed") is None
    assert report.bootstrap_ci([0.1]) is None  # one pair: no interval
    assert report.t_ci([0.1]) is None
    sd = (sum((d - result["mean"]) ** 2 for d in diffs) / 2) ** 0.5  # n - 1 = 2
    half = 4.302653 * sd / 3 ** 0.5  # t_{0.975, 2 df}
    assert result["t_ci"] == pytest.approx((result["mean"] - half, result["mean"] + half), abs=1e-6)


def test_t_interval_is_hand_computed_and_wider_than_the_bootstrap_for_two_pairs():
    report = load_report()
    # mean 0.2, sd 0.1414 (n - 1), se 0.1, t_{0.975, 1 df} = 12.7062: the interval spans zero
    assert report.t_ci([0.1, 0.3]) == pytest.approx((0.2 - 1.270620, 0.2 + 1.270620), abs=1e-6)
    # the percentile bootstrap of two pairs can only return the range of the two values
    low, high = report.bootstrap_ci([0.1, 0.3])
    assert 0.1 <= low and high <= 0.3
    assert report.t_ci([0.05, 0.05, 0.05]) == pytest.approx((0.05, 0.05))  # no spread: no width


def test_bootstrap_interval_is_reproducible_and_shrinks_with_more_pairs():
    report = load_report()
    few = [0.05, -0.02, 0.08, 0.01]
    assert report.bootstrap_ci(few) == report.bootstrap_ci(few)
    many = few * 25
    (lo_few, hi_few), (lo_many, hi_many) = report.bootstrap_ci(few), report.bootstrap_ci(many)
    assert hi_many - lo_many < 0.5 * (hi_few - lo_few)
    assert lo_many < 0.03 < hi_many  # the mean of the differences, 0.03


def test_arm_summary_is_mean_and_sample_std_over_runs_and_baseline_over_folds():
    report = load_report()
    records = [_record("learned", 0, 1, 0.6, (0.5, 0.7)), _record("learned", 1, 1, 0.8, (0.7, 0.9)),
               _record("learned", 1, 2, 0.7, (0.9, 0.5)), _record("off", 0, 1, 0.5)]
    rows = {r["arm"]: r for r in report.arm_summary(records)}
    learned = rows["learned"]
    assert learned["n"] == 3 and learned["folds"] == [0, 1] and learned["seeds"] == [1, 2]
    assert learned["mean"] == pytest.approx((0.7, 0.1))  # mean 0.7, sample std 0.1
    assert learned["classes"]["liver"] == pytest.approx((0.7, 0.2))
    assert rows["off"]["mean"] == (0.5, 0.0)
    copy = rows["copy-the-support"]
    assert copy["n"] == 2 and copy["mean"][0] == pytest.approx((0.1 + 0.2) / 2)  # one value per fold
    text = report.summary_markdown(records)
    assert "| learned | 3 | 0 1 | 1 2 | 0.700 +- 0.200 | 0.700 +- 0.200 | 0.700 +- 0.100 |" in text and "| learned - off | +0.100 | n/a (one pair) | n/a (one pair) | 1 |" in text


def test_config_seed_runs_are_named_config_beside_the_tagged_seeds():
    report = load_report()
    # the config's seed (no tag) and seed 1 on one fold: the arm has two seeds, not one
    records = [_record("learned", 0, None, 0.64, (0.6, 0.7)), _record("learned", 0, 1, 0.66, (0.6, 0.7)),
               _record("off", 0, None, 0.63, (0.6, 0.7)), _record("off", 0, 1, 0.63, (0.6, 0.7))]
    for r in records:
        r.update(step=3600, last_mean=None, precision=0.5, recall=0.5)
    rows = {r["arm"]: r for r in report.arm_summary(records)}
    assert rows["learned"]["seeds"] == [None, 1]  # None: the config's seed
    assert rows["copy-the-support"]["seeds"] == []
    text = report.summary_markdown(records)
    assert "| learned | 2 | 0 | config 1 |" in text and "| copy-the-support | 1 | 0 | - |" in text
    _, table = report.table_rows(records)
    assert [row[2] for row in table if row[1] == "learned"] == ["config", 1]
    assert report.paired_differences(records, "learned", "off")["n"] == 2  # config with config, 1 with 1


def test_seeded_run_folders_are_read_with_their_seed(tmp_path):
    report = load_report()
    copy = {"liver": 0.5, "spleen": 0.3}
    write_run(tmp_path, 0, "learned_seed1", {"liver": 0.6, "spleen": 0.4}, copy, {100: 0.2}, 300, 0.4)
    write_run(tmp_path, 0, "learned_st_seed2", {"liver": 0.7, "spleen": 0.5}, copy, {100: 0.1}, 300, 0.9)
    records = sorted(report.collect(tmp_path), key=lambda r: r["seed"])
    assert [(r["mode"], r["seed"]) for r in records] == [("learned", 1), ("learned_st", 2)]
    header, rows = report.table_rows(records)
    assert header[:4] == ["fold", "arm", "seed", "steps"]
    assert rows[0][:4] == [0, "learned", 1, 300] and rows[1][:4] == [0, "learned_st", 2, 300]


# ----------------------------------------------------------------------------- methods as arms
def write_method_run(root: Path, folder_arm: str, fold: int, seed: int, mean: float, model: dict | None,
                     minutes: tuple = (), scalars: tuple = ("loss", "xi", "kept_fraction")) -> Path:
    """A run folder as ablation.sh names it (cpu recipe, seeded): results with provenance (None: none),
    one Sacred training run per entry of ``minutes`` (a resumed run has several), metrics ``scalars``."""
    run = root / f"CHAOST2_setting1_fold{fold}_{folder_arm}_cpu-68cf282b_seed{seed}"
    summary = {"classes": {"liver": {"model": {"dice": mean, "precision": 0.0, "recall": 0.0},
                                     "copy_support": {"dice": 0.3}}},
               "supports": [{"support_id": 3}],
               "mean": {"model": {"dice": mean, "precision": 0.5, "recall": 0.5}, "copy_support": {"dice": 0.3}}}
    if model is not None:
        summary["provenance"] = {"training_config": {"seed": seed, "tag": f"seed{seed}", "model": model}}
    (run / "results").mkdir(parents=True)
    (run / "results" / "results.json").write_text(json.dumps(summary))
    steps = [10, 20, 30]
    for i, length in enumerate(minutes or (None,), start=1):
        (run / "train" / str(i)).mkdir(parents=True)
        metrics = {name: {"steps": steps, "values": [0.5] * 3} for name in scalars} if i == 1 else {}
        (run / "train" / str(i) / "metrics.json").write_text(json.dumps(metrics))
        if length is not None:  # the last of a resumed run may still be running: its heartbeat counts
            end = "stop_time" if i < len(minutes) else "heartbeat"
            start = f"2026-01-0{i}T10:00:00.000000"
            stop = f"2026-01-0{i}T{10 + int(length) // 60:02d}:{int(length) % 60:02d}:30.000000"
            (run / "train" / str(i) / "run.json").write_text(json.dumps({"start_time": start, end: stop}))
    return run


DMAP_LEARNED = {"method": "dmap", "dmap_mode": "learned", "pooling": "dmap", "backbone": "resnet18"}
ADNET = {"method": "adnet", "dmap_mode": "learned", "pooling": "map", "backbone": "resnet18"}


@pytest.fixture()
def two_methods(tmp_path):
    means = {("learned", 0, 1): 0.60, ("learned", 0, 2): 0.50, ("learned", 1, 1): 0.70, ("learned", 1, 2): 0.40,
             ("adnet", 0, 1): 0.55, ("adnet", 0, 2): 0.45, ("adnet", 1, 1): 0.50, ("adnet", 1, 2): 0.30}
    for (arm, fold, seed), mean in means.items():
        model = DMAP_LEARNED if arm == "learned" else ADNET
        scalars = ("loss", "xi", "kept_fraction") if arm == "learned" else ("loss", "align_loss", "threshold")
        write_method_run(tmp_path, arm, fold, seed, mean, model, minutes=(10, 5) if arm == "adnet" else (20,),
                         scalars=scalars)
    return tmp_path, means


def fake_parameters(model):
    return 1_500_000 if model["method"] == "adnet" else 2_250_000


def test_two_methods_give_one_arm_each_with_paired_differences_params_and_time(two_methods, monkeypatch):
    report = load_report()
    root, means = two_methods
    monkeypatch.setattr(report, "model_parameters", fake_parameters)
    records = report.collect(root)
    assert sorted({(r["mode"], r["method"]) for r in records}) == [("adnet", "adnet"), ("learned", "dmap")]
    assert {r["mode"]: r["debiased"] for r in records} == {"learned": True, "adnet": False}
    rows = {r["arm"]: r for r in report.arm_summary(records)}
    assert list(rows) == ["learned", "adnet", "copy-the-support"]  # DMAP modes first, then the methods
    assert rows["adnet"]["n"] == 4 and rows["adnet"]["folds"] == [0, 1] and rows["adnet"]["seeds"] == [1, 2]
    assert rows["adnet"]["mean"][0] == pytest.approx((0.55 + 0.45 + 0.50 + 0.30) / 4)
    assert rows["adnet"]["params"] == [1_500_000]
    # 10.5 + 5.5 minutes over a resumed run's two Sacred runs (stop_time, then the last heartbeat)
    assert rows["adnet"]["train_min"] == pytest.approx((16.0, 0.0))
    assert rows["learned"]["train_min"] == pytest.approx((20.5, 0.0))
    pair = report.paired_differences(records, "learned", "adnet")
    assert pair["n"] == 4 and [(f, s) for f, s, _ in pair["pairs"]] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert pair["mean"] == pytest.approx(sum(means[("learned", f, s)] - means[("adnet", f, s)]
                                             for f in (0, 1) for s in (1, 2)) / 4)
    text = report.summary_markdown(records)
    assert "| mean | params (M) | train time (min) |" in text
    assert "| adnet | 4 | 0 1 | 1 2 | 0.450 +- 0.108 | 0.450 +- 0.108 | 1.50 | 16.0 +- 0.0 |" in text
    assert "| learned | 4 | 0 1 | 1 2 |" in text and "| 2.25 | 20.5 +- 0.0 |" in text
    assert "| learned - adnet | +0.100 |" in text and text.count("| 4 |\n") == 1  # one pair of arms, 4 pairs
    assert "| copy-the-support | 2 | 0 1 | - | 0.300 +- 0.000 | 0.300 +- 0.000 | - | - |" in text
    header, table = report.table_rows(records)
    assert [row[1] for row in table if row[0] == 0] == ["learned", "learned", "adnet", "adnet", "copy-the-support"]


def test_methods_without_de_biasing_scalars_are_plotted(two_methods, monkeypatch):
    report = load_report()
    root, _ = two_methods
    monkeypatch.setattr(report, "model_parameters", fake_parameters)
    assert report.main([str(root)]) == 0
    for name in ("curves_fold0.png", "curves_fold1.png", "dice_vs_step.png"):
        assert (root / name).read_bytes()[:4] == b"\x89PNG"
    assert "| adnet |" in (root / "summary.md").read_text()


def test_the_offset_curve_is_adnets_threshold_else_tau_else_absent():
    report = load_report()
    tau, threshold = ([20, 40], [-3.0, -4.0]), ([20, 40], [-10.5, -11.0])
    assert report.offset_series({"tau": tau, "loss": ([20], [1.0])}) == tau
    assert report.offset_series({"tau": tau, "threshold": threshold}) == threshold
    assert report.offset_series({"loss": ([20], [1.0])}) is None  # ALPNet logs neither


def test_the_arm_comes_from_the_recorded_method_else_from_the_folder(tmp_path):
    report = load_report()
    assert report.arm_name({"method": "qnet", "dmap_mode": "learned"}) == "qnet"
    assert report.arm_name({"method": "dmap", "dmap_mode": "learned_st"}) == "learned_st"
    assert report.arm_name({"dmap_mode": "off"}) == "off"  # a config without method: DMAP
    # a method de-biased by DMAP's pooling: the mode matters, so the arm names it
    assert report.arm_name({"method": "adnet", "pooling": "dmap", "dmap_mode": "fixed"}) == "adnet-fixed"
    assert report.debiases({"method": "adnet", "pooling": "dmap", "dmap_mode": "fixed"}, "adnet")
    # the training config decides over the folder's name
    write_method_run(tmp_path, "learned", 0, 1, 0.5, {"method": "alpnet", "dmap_mode": "learned"})
    write_method_run(tmp_path, "qnet", 1, 2, 0.4, None)  # no provenance: the folder's name
    write_method_run(tmp_path, "off", 2, 3, 0.3, None)
    records = sorted(report.collect(tmp_path, parameters=False), key=lambda r: r["fold"])
    assert [(r["mode"], r["seed"], r["method"], r["debiased"]) for r in records] == [
        ("alpnet", 1, "alpnet", False), ("qnet", 2, "qnet", False), ("off", 3, "dmap", False)]
    assert [r["params"] for r in records] == [None, None, None]
    assert [r["train_min"] for r in records] == [None, None, None]  # no run.json


def test_trainable_parameter_count_leaves_frozen_parts_out():
    import torch.nn as nn

    from models.fewshot import trainable_parameter_count

    tiny = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))  # 8 + 3 values
    assert trainable_parameter_count(tiny) == 11
    tiny[1].requires_grad_(False)
    assert trainable_parameter_count(tiny) == 8


@pytest.mark.slow
def test_parameters_are_counted_on_the_model_the_training_config_describes():
    import warnings

    from config import build_config, resolve_config
    from models.fewshot import FewShotSeg

    report = load_report()

    def model(**updates):
        return resolve_config(build_config(["cpu"], {"model": updates}), need_data=False)["model"]

    learned, off, adnet = (report.model_parameters(model(dmap_mode="learned")),
                           report.model_parameters(model(dmap_mode="off")),
                           report.model_parameters(dict(model(method="adnet"), weights_path="/no/such/file.pth")))
    with warnings.catch_warnings():  # "randomly initialised": on purpose
        warnings.simplefilter("ignore")
        ltg = sum(p.numel() for p in FewShotSeg(backbone="resnet18").ltg.parameters())
    assert learned - off == ltg > 0  # off mode freezes LTG
    assert 0 < adnet < off  # ADNet: no tau head, layer4 frozen; the weights file is not read


# ----------------------------------------------------------------------------- ablation.sh arms
def dry_run(tmp_path, *words, **env):
    import os
    import subprocess

    env = {**os.environ, "DRY_RUN": "1", "LOG_DIR": str(tmp_path / "sweep"), **env}
    return subprocess.run(["bash", str(REPO / "script" / "ablation.sh"), *words], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_dash_in_seeds_is_the_configs_seed_beside_the_tagged_seeds(tmp_path):
    done = dry_run(tmp_path, "cpu", MODES="learned off", FOLDS="0 1", SEEDS="- 2")
    assert done.returncode == 0, done.stderr
    names = [line[3:] for line in done.stdout.splitlines() if line.startswith("== ")]
    assert names == ["CHAOST2_setting1_fold0_learned", "CHAOST2_setting1_fold0_off", "CHAOST2_setting1_fold1_learned",
                     "CHAOST2_setting1_fold1_off", "CHAOST2_setting1_fold0_learned_seed2",
                     "CHAOST2_setting1_fold0_off_seed2", "CHAOST2_setting1_fold1_learned_seed2",
                     "CHAOST2_setting1_fold1_off_seed2"]
    train = [line.split() for line in done.stdout.splitlines() if line.startswith("train: ")]
    assert not any(w.startswith(("seed=", "tag=")) for w in train[0]), "the config's seed must stay untagged"
    assert "seed=2" in train[4] and "tag=seed2" in train[4]


def test_ablation_script_sweeps_methods_folds_and_seeds_in_a_dry_run(tmp_path):
    done = dry_run(tmp_path, "cpu", METHODS="dmap:learned dmap:off adnet qnet alpnet", FOLDS="0 1 2", SEEDS="1 2 3")
    assert done.returncode == 0, done.stderr
    train = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("train: ")]
    evaluate = [line for line in done.stdout.splitlines() if line.startswith("evaluate: ")]
    assert len(train) == len(evaluate) == 5 * 3 * 3
    assert train[0][:4] == ["python", "training.py", "with", "cpu"] and train[0][-1] == "resume=True"

    def arm(words):
        return tuple(w for w in words if w.startswith(("model.", "eval_fold=", "seed=", "tag=")))

    arms = {arm(words) for words in train}
    assert ("eval_fold=2", "model.method=adnet", "seed=3", "tag=seed3") in arms
    assert ("eval_fold=0", "model.method=dmap", "model.dmap_mode=off", "seed=1", "tag=seed1") in arms
    assert ("eval_fold=1", "model.method=qnet", "seed=2", "tag=seed2") in arms
    assert ("eval_fold=1", "model.method=alpnet", "seed=2", "tag=seed2") in arms
    assert len(arms) == 45 and not any("model.dmap_mode=learned" in a and "model.method=adnet" in a for a in arms)
    assert "== CHAOST2_setting1_fold2_qnet_seed3" in done.stdout
    assert "model.method=adnet" in evaluate[2] and evaluate[2].split()[1:4] == ["python", "script/evaluate_snapshots.py", "--"]
    assert not (tmp_path / "sweep").exists()  # a dry run writes nothing


def test_ablation_script_passes_eval_last_and_raw_too_to_the_evaluation(tmp_path):
    done = dry_run(tmp_path, "cpu", ARMS="0:learned:1", EVAL_LAST="2", RAW_TOO="1")
    assert done.returncode == 0, done.stderr
    evaluate = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("evaluate: ")]
    assert len(evaluate) == 1
    own = evaluate[0][2:evaluate[0].index("--")]  # between the script and the test.py words
    assert own == ["--raw-too", "--last", "2"]


def test_ablation_script_keeps_arms_and_modes_and_refuses_unknown_arms(tmp_path):
    done = dry_run(tmp_path, ARMS="0:learned 1:adnet:4")
    assert done.returncode == 0, done.stderr
    train = [line for line in done.stdout.splitlines() if line.startswith("train: ")]
    assert "eval_fold=0 model.method=dmap model.dmap_mode=learned resume=True" in train[0]
    assert "eval_fold=1 model.method=adnet seed=4 tag=seed4 resume=True" in train[1]
    # an ARMS written over several lines keeps every line's arms
    lines = dry_run(tmp_path, ARMS="0:learned 0:off:1\n    1:learned_st 2:qnet:2\n")
    assert [line.split("== ")[1] for line in lines.stdout.splitlines() if line.startswith("== ")] == [
        "CHAOST2_setting1_fold0_learned", "CHAOST2_setting1_fold0_off_seed1", "CHAOST2_setting1_fold1_learned_st",
        "CHAOST2_setting1_fold2_qnet_seed2"]
    modes = dry_run(tmp_path, MODES="fixed off", FOLDS="3")
    assert [line.split("== ")[1] for line in modes.stdout.splitlines() if line.startswith("== ")] == [
        "CHAOST2_setting1_fold3_fixed", "CHAOST2_setting1_fold3_off"]
    for env in ({"METHODS": "dmap adnet panet"}, {"ARMS": "0:learned 0:dmap"}):
        refused = dry_run(tmp_path, **env)
        assert refused.returncode == 2 and "ablation.sh:" in refused.stderr and "train:" not in refused.stdout


def test_a_method_among_the_arguments_sweeps_its_modes_and_excludes_method_arms(tmp_path):
    done = dry_run(tmp_path, "cpu", "model.method=adnet", "model.pooling=dmap", MODES="learned off")
    assert done.returncode == 0, done.stderr
    train = [line for line in done.stdout.splitlines() if line.startswith("train: ")]
    assert len(train) == 2 and all("model.method=dmap" not in line for line in train)
    assert "model.method=adnet model.pooling=dmap" in train[0] and "model.dmap_mode=off resume=True" in train[1]
    for env in ({"METHODS": "adnet"}, {"ARMS": "0:learned 0:qnet"}):
        refused = dry_run(tmp_path, "cpu", "model.method=qnet", **env)
        assert refused.returncode == 2 and "name the methods in one place" in refused.stderr


def test_stability_is_final_against_the_mean_and_lowest_of_the_last_three():
    report = load_report()
    # unsorted on purpose: the last three are steps 200, 300, 400 (0.5, 0.2, 0.6), not the last listed
    got = report.stability([(400, 0.6), (100, 0.9), (300, 0.2), (200, 0.5)])
    assert got == {"final": 0.6, "last_mean": pytest.approx(1.3 / 3), "last_min": 0.2,
                   "final_minus_last_mean": pytest.approx(0.6 - 1.3 / 3)}
    assert report.stability([(100, 0.9), (200, 0.5)]) is None  # two evaluations are not three


def test_dice_by_step_gives_stability_and_every_step_of_averaged_and_raw_weights():
    report = load_report()
    averaged = {"mode": "learned", "fold": 0, "seed": None, "weights": "averaged",
                "snapshots": [(100, 0.4), (200, 0.5), (300, 0.6)], "raw_snapshots": [(100, 0.1), (300, 0.7)],
                "recalls": {100: 0.25, 300: 0.5}, "raw_recalls": {100: 0.13}}
    raw_only = {"mode": "off", "fold": 1, "seed": 2, "weights": "raw", "snapshots": [(300, 0.3)],
                "raw_snapshots": []}
    text = report.dice_by_step_markdown([averaged, raw_only])
    assert "| fold 0 learned | averaged | 0.600 | 0.500 | 0.400 | +0.100 |" in text
    assert "| fold 0 learned | raw | - | - | - | - |" in text  # two raw evaluations: no last-3 figure
    assert "| fold 1 off seed 2 | raw | - | - | - | - |" in text
    assert text.count("| fold 1 off seed 2 | raw |") == 1  # raw weights are not listed twice
    assert "| fold 0 learned | 100 | 0.400 (recall 0.25), averaged | 0.100 (recall 0.13) |" in text
    assert "| fold 0 learned | 200 | 0.500, averaged | - |" in text  # no recall recorded at this step
    assert "| fold 0 learned | 300 | 0.600 (recall 0.50), averaged | 0.700 |" in text
    assert "| fold 1 off seed 2 | 300 | 0.300, raw | - |" in text


EARLIER_HEADER = "fold,arm,seed,steps,liver,spleen,mean,mean of last 3 checkpoints,precision,recall\n"


def test_an_earlier_table_adds_its_runs_and_a_run_folder_wins_over_its_row(ablation, tmp_path, capsys):
    report = load_report()
    earlier = tmp_path / "earlier.csv"
    earlier.write_text(EARLIER_HEADER
                       + "0,learned,config,300,0.9,0.9,0.9,,0.1,0.1\n"  # the run folder of fold 0 learned wins
                       + "0,off,config,300,0.4,0.2,0.3,0.35,0.2,0.6\n"
                       + "0,off,1,300,0.1,0.1,0.1,,0.2,0.6\n"
                       + "0,copy-the-support,,,0.5,0.3,0.4,,,\n"
                       + "mean of 2 folds (0 1),learned,,,0.1,0.1,0.1,,,\n")
    records = report.merge_earlier(report.collect(ablation), report.read_earlier(earlier))
    runs = {(r["fold"], r["mode"], r["seed"]): r for r in records}
    assert len(records) == 5  # 3 run folders + off (config) + off (seed 1); the means row is skipped
    assert runs[(0, "learned", None)]["mean"] == pytest.approx(0.5)  # the folder's 0.5, not the row's 0.9
    off = runs[(0, "off", None)]
    assert (off["mean"], off["last_mean"], off["step"], off["copy_mean"]) == (0.3, 0.35, 300, 0.4)
    assert off["model"] == {"liver": 0.4, "spleen": 0.2} and off["copy"] == {"liver": 0.5, "spleen": 0.3}
    assert runs[(0, "off", 1)]["last_mean"] is None
    pair = report.paired_differences(records, "learned", "off")
    assert pair["n"] == 1 and pair["mean"] == pytest.approx(0.5 - 0.3)  # fold 0, config seed only

    assert report.main([str(ablation), "--earlier", str(earlier), "--no-plots"]) == 0
    summary = (ablation / "summary.md").read_text()
    assert "| learned - off | +0.200 |" in summary
    assert f"2 of the 5 runs come from earlier tables ({earlier})" in summary
    by_step = (ablation / "dice_by_step.md").read_text()
    assert "fold 0 off" not in by_step  # no curve in a table
    capsys.readouterr()


@pytest.mark.parametrize("text, message", [
    (EARLIER_HEADER + "0,off,config,300,0.4,0.2,0.3,,0.2,0.6\n0,copy-the-support,,,0.5,0.3,0.41,,,\n",
     "fold 0's copy-the-support Dice is 0.4100, 0.4000 in"),
    (EARLIER_HEADER + "1,off,config,300,0.4,0.2,0.3,,0.2,0.6\n", "fold 1 has runs but no copy-the-support row"),
    ("fold,arm,steps,liver,spleen\n0,off,300,0.4,0.2\n", "missing mean, precision, recall"),
    (EARLIER_HEADER + "0,off,config,300,0.4,high,0.3,,0.2,0.6\n0,copy-the-support,,,0.5,0.3,0.4,,,\n",
     "a value is not a number"),
])
def test_an_earlier_table_that_does_not_fit_is_a_one_line_error(ablation, tmp_path, capsys, text, message):
    report = load_report()
    earlier = tmp_path / "earlier.csv"
    earlier.write_text(text)
    assert report.main([str(ablation), "--earlier", str(earlier), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(earlier) in err and err.count("\n") == 1


def test_a_missing_earlier_table_is_a_one_line_error(ablation, tmp_path, capsys):
    report = load_report()
    assert report.main([str(ablation), "--earlier", str(tmp_path / "none.csv"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "none.csv: cannot read" in err and err.count("\n") == 1


def test_select_keeps_the_runs_of_the_given_folds_and_seeds():
    report = load_report()
    records = [{"fold": f, "seed": s, "mode": "learned"} for f in (0, 1, 2) for s in (None, 1, 2)]
    assert report.select(records) == records
    kept = report.select(records, folds=[0, 2], seeds=["config", "2"])
    assert [(r["fold"], r["seed"]) for r in kept] == [(0, None), (0, 2), (2, None), (2, 2)]
    assert [r["seed"] for r in report.select(records, seeds=["config"])] == [None, None, None]


def test_folds_seeds_and_out_give_a_report_of_the_selection_elsewhere(two_methods, monkeypatch, tmp_path_factory):
    report = load_report()
    root, means = two_methods
    monkeypatch.setattr(report, "model_parameters", fake_parameters)
    out = tmp_path_factory.mktemp("selection") / "fold1_seed2"
    assert report.main([str(root), "--folds", "1", "--seeds", "2", "--out", str(out), "--no-plots"]) == 0
    text = (out / "summary.md").read_text()
    assert "| adnet | 1 | 1 | 2 | 0.300 +- 0.000 |" in text and "| learned | 1 | 1 | 2 | 0.400 +- 0.000 |" in text
    assert not (root / "summary.md").exists()  # the log folder is left as it was
    assert report.main([str(root), "--seeds", "config", "--no-plots"]) == 2  # no run of the config's seed
    assert report.main([str(root), "--seeds", "one", "--no-plots"]) == 2
