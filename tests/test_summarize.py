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
    for fold, liver, spleen, copy in ((0, 0.8, 0.4, 0.3), (1, 0.6, 0.6, 0.5)):
        out = tmp_path / f"CHAOST2_setting1_fold{fold}_learned" / "results"
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps(fake_result(fold, liver, spleen, copy)))
    assert load_summarize().main([str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    entry = summary["CHAOST2_setting1_learned"]
    assert entry["folds"] == [0, 1]
    assert abs(entry["classes"]["liver"]["dice_mean"] - 0.7) < 1e-12
    # sample standard deviation (ddof 1) of 0.8 and 0.6: sqrt(0.02), not the population 0.1
    assert abs(entry["classes"]["liver"]["dice_std"] - 0.02 ** 0.5) < 1e-12
    assert abs(entry["classes"]["mean"]["dice_mean"] - 0.6) < 1e-12
    assert abs(entry["classes"]["spleen"]["copy_dice_mean"] - 0.4) < 1e-12
    assert abs(entry["classes"]["spleen"]["copy_dice_std"] - 0.02 ** 0.5) < 1e-12
    assert (tmp_path / "summary.csv").read_text().count("\n") == 1 + 3
    assert "liver" in capsys.readouterr().out


def test_no_results_is_a_clear_error(tmp_path, capsys):
    assert load_summarize().main([str(tmp_path)]) == 2
    assert "no */results/results.json" in capsys.readouterr().err


def write_fold(root, fold, folder="CHAOST2_setting1_fold{}_learned", **training):
    from config import build_config

    result = fake_result(fold, 0.8, 0.4, 0.3)
    result["provenance"] = {"training_config": build_config([], {"eval_fold": fold, **training}),
                            "checkpoint": {"path": f"ckpt{fold}.pth", "sha256": f"{fold:064d}", "step": 33000},
                            "code": {"git": {"commit": "a" * 40, "dirty": False}}, "data": {"sha256": "d" * 64}}
    out = root / folder.format(fold) / "results"
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps(result))


def test_folds_of_one_recipe_are_averaged_with_their_provenance(tmp_path):
    for fold in (0, 1):
        write_fold(tmp_path, fold, supp_idx=fold)  # evaluation keys may differ
    assert load_summarize().main([str(tmp_path)]) == 0
    entry = json.loads((tmp_path / "summary.json").read_text())["CHAOST2_setting1_learned"]
    assert [p["eval_fold"] for p in entry["provenance"]] == [0, 1]
    assert entry["provenance"][1]["checkpoint_sha256"] == f"{1:064d}" and entry["provenance"][1]["step"] == 33000
    assert entry["provenance"][0]["git"]["commit"] == "a" * 40 and entry["provenance"][0]["data_sha256"] == "d" * 64


def test_folds_of_different_recipes_are_refused_unless_allowed(tmp_path, capsys):
    write_fold(tmp_path, 0)
    write_fold(tmp_path, 1, optim={"lr": 0.5})
    summarize = load_summarize()
    assert summarize.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "optim.lr: 0.001" in err[0] and "0.5" in err[0]
    assert "eval_fold" not in err[0] and not (tmp_path / "summary.json").exists()
    assert summarize.main([str(tmp_path), "--allow-mixed"]) == 0
    assert (tmp_path / "summary.json").is_file()


def test_a_fold_without_a_training_config_cannot_join_one_with(tmp_path, capsys):
    write_fold(tmp_path, 0)
    out = tmp_path / "CHAOST2_setting1_fold1_learned" / "results"
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps(fake_result(1, 0.6, 0.6, 0.3)))
    assert load_summarize().main([str(tmp_path)]) == 2
    assert "records no training config" in capsys.readouterr().err
