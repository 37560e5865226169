"""script/summarize.py: mean and spread over folds, on hand-made results files."""
import importlib.util
import json

from config import REPO_ROOT


def load_summarize():
    spec = importlib.util.spec_from_file_location("summarize", REPO_ROOT / "script" / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_result(fold, liver, spleen, copy):
    cls = lambda d: {"model": {"dice": d}, "copy_support": {"dice": copy}}  # noqa: E731
    return {"eval_fold": fold, "classes": {"liver": cls(liver), "spleen": cls(spleen)},
            "mean": {"model": {"dice": (liver + spleen) / 2}, "copy_support": {"dice": copy}}}


def test_folds_are_averaged_per_organ(tmp_path, capsys):
    for fold, liver, spleen in ((0, 0.8, 0.4), (1, 0.6, 0.6)):
        out = tmp_path / f"CHAOST2_setting1_fold{fold}_learned" / "results"
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps(fake_result(fold, liver, spleen, 0.3)))
    assert load_summarize().main([str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    entry = summary["CHAOST2_setting1_learned"]
    assert entry["folds"] == [0, 1]
    assert abs(entry["classes"]["liver"]["dice_mean"] - 0.7) < 1e-12
    assert abs(entry["classes"]["liver"]["dice_std"] - 0.1) < 1e-12
    assert abs(entry["classes"]["mean"]["dice_mean"] - 0.6) < 1e-12
    assert entry["classes"]["spleen"]["copy_dice_mean"] == 0.3
    assert (tmp_path / "summary.csv").read_text().count("\n") == 1 + 3
    assert "liver" in capsys.readouterr().out


def test_no_results_is_a_clear_error(tmp_path, capsys):
    assert load_summarize().main([str(tmp_path)]) == 2
    assert "no */results/results.json" in capsys.readouterr().err
