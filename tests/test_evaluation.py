"""EP1's numbers on hand-computed cases: per query, per class, means, spread over supports, CSV, table.

The model is replaced by a table of predictions, so every reported number can be worked out by hand: each
query has one kept slice whose 4 target voxels are all foreground, and the prediction marks ``k`` of them
(no false positives), so Dice = 2k / (k + 4): k = 0, 1, 2, 4 give 0, 0.4, 2/3, 1; recall = k / 4. The
copy baseline always marks 2 of the 4 (Dice 2/3, recall 0.5). A mean turned into a max, a std into a mean,
or model and baseline swapped would each change an asserted number.
"""
from __future__ import annotations

import csv
import json
import logging
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import evaluation.ep1_fold as ep1_fold
from dataloaders.dataset_specifics import get_dataset_spec
from dataloaders.volume_io import Case
from evaluation.checkpoint_choice import check_checkpoint, checkpoint_training_ids
from evaluation.ep1_fold import EP1Options, evaluate_fold
from evaluation.results import format_table, write_results

LIVER, SPLEEN = 1, 4
# (support id, query id, class) -> k target voxels the model finds
K = {
    (1, 2, LIVER): 4, (1, 3, LIVER): 2, (1, 2, SPLEEN): 1, (1, 3, SPLEEN): 0,
    (2, 1, LIVER): 2, (2, 3, LIVER): 2, (2, 1, SPLEEN): 4, (2, 3, SPLEEN): 1,
    (3, 1, LIVER): 1, (3, 2, LIVER): 0, (3, 1, SPLEEN): 4, (3, 2, SPLEEN): 4,
}
COPY_K = 2


SPEC = get_dataset_spec("SYNTH")
CPU = torch.device("cpu")


def make_case(case_id: int, classes=(LIVER, SPLEEN), image_path=None) -> Case:
    """Two slices of 4 x 4: liver in slice 0, spleen in slice 1 (those in ``classes``)."""
    label = np.zeros((2, 4, 4), np.uint8)
    for z, cls in enumerate((LIVER, SPLEEN)):
        if cls in classes:
            label[z, 0, :] = cls
    image = np.arange(32, dtype=np.float32).reshape(2, 4, 4)
    return Case(case_id, image, label, None, (1.0, 1.0, 1.0), image_path or f"image_{case_id}.nii.gz")


def fake_predict(calls: list):
    def predict(model, support, query, label, *args, **kwargs):
        calls.append((support.case_id, query.case_id, label))
        z = LIVER - 1 if label == LIVER else 1
        target = np.zeros((1, 4, 4), np.uint8)
        target[0, 0, :] = 1
        prob = np.zeros((1, 4, 4), np.float32)
        prob[0, 0, : K[(support.case_id, query.case_id, label)]] = 0.9
        copy = np.zeros((1, 4, 4), np.uint8)
        copy[0, 0, :COPY_K] = 1
        return {"slices": np.array([z]), "prob": prob, "copy": copy, "target": target}
    return predict


def options(**updates) -> EP1Options:
    return EP1Options(test_labels=(LIVER, SPLEEN), **updates)


def run(monkeypatch, cases, **updates):
    calls = []
    monkeypatch.setattr(ep1_fold, "predict_query", fake_predict(calls))
    summary = evaluate_fold(None, cases, SPEC, options(**updates), CPU)
    return summary, calls


def dice(k):
    return 2 * k / (k + 4)


def test_rotated_supports_by_hand(monkeypatch):
    summary, calls = run(monkeypatch, [make_case(1), make_case(2), make_case(3)], rotate_support=True)
    assert len(calls) == 3 * 2 * 2  # supports x classes x queries
    assert [r["support_id"] for r in summary["supports"]] == [1, 2, 3]

    first = summary["supports"][0]  # support 1, queries 2 and 3
    assert first["classes"]["liver"]["per_query"]["3"]["model"]["dice"] == pytest.approx(2 / 3)
    assert first["classes"]["liver"]["per_query"]["3"]["n_slices"] == 1
    assert first["classes"]["liver"]["model"]["dice"] == pytest.approx((1 + 2 / 3) / 2)  # 5/6
    assert first["classes"]["spleen"]["model"]["dice"] == pytest.approx((0.4 + 0) / 2)
    assert first["mean"]["model"]["dice"] == pytest.approx((5 / 6 + 0.2) / 2)
    assert first["classes"]["spleen"]["model"]["precision"] == pytest.approx((1 + 0) / 2)  # k = 0: 0/0 -> 0
    assert first["classes"]["spleen"]["model"]["recall"] == pytest.approx((0.25 + 0) / 2)

    # per support: liver 5/6, 2/3, 1/5; spleen 1/5, 7/10, 1; overall 31/60, 41/60, 36/60
    liver = summary["classes"]["liver"]
    assert liver["model"]["dice"] == pytest.approx(17 / 30)
    assert liver["dice_std_over_supports"] == pytest.approx(math.sqrt((8**2 + 3**2 + 11**2) / 3) / 30)
    assert liver["model"]["recall"] == pytest.approx((0.75 + 0.5 + 0.125) / 3)
    assert summary["classes"]["spleen"]["model"]["dice"] == pytest.approx(1.9 / 3)
    assert summary["mean"]["model"]["dice"] == pytest.approx(0.6)
    assert summary["mean"]["dice_std_over_supports"] == pytest.approx(math.sqrt(50 / 3) / 60)
    for cls in ("liver", "spleen"):  # the baseline is its own column
        assert summary["classes"][cls]["copy_support"]["dice"] == pytest.approx(2 / 3)
        assert summary["classes"][cls]["copy_support"]["recall"] == pytest.approx(0.5)
    assert summary["mean"]["copy_support"]["iou"] == pytest.approx(0.5)


def test_csv_rows_and_table(monkeypatch, tmp_path):
    summary, _ = run(monkeypatch, [make_case(1), make_case(2), make_case(3)], rotate_support=True)
    json_path, csv_path = write_results(summary, tmp_path)
    assert json.loads(json_path.read_text())["mean"]["model"]["dice"] == pytest.approx(0.6)
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 3 * 2 * 2 * 2  # supports x classes x queries x methods
    pick = {(r["support_id"], r["class"], r["query_id"], r["method"]): r for r in rows}
    assert pick[("2", "spleen", "3", "model")]["dice"] == "0.4000"
    assert pick[("2", "spleen", "3", "model")]["recall"] == "0.2500"
    assert pick[("2", "spleen", "3", "copy_support")]["dice"] == "0.6667"
    assert pick[("1", "liver", "2", "model")]["n_slices"] == "1"

    lines = format_table(summary).splitlines()
    assert lines[0].split() == ["class", "Dice", "IoU", "Prec", "Recall", "copy", "Dice"]
    liver = lines[1].split()
    assert liver[0] == "liver" and liver[1] == "0.5667" and liver[4] == "0.4583" and liver[5] == "0.6667"
    assert lines[3].split()[:2] == ["mean", "0.6000"]


def test_single_support_uses_supp_idx(monkeypatch):
    summary, calls = run(monkeypatch, [make_case(1), make_case(2), make_case(3)], supp_idx=2)
    assert {c[0] for c in calls} == {3} and len(summary["supports"]) == 1
    assert summary["classes"]["liver"]["model"]["dice"] == pytest.approx((0.4 + 0) / 2)
    assert summary["classes"]["liver"]["dice_std_over_supports"] == 0.0
    assert summary["mean"]["model"]["dice"] == pytest.approx((0.2 + 1.0) / 2)


def test_query_without_a_class_is_nan_and_left_out(monkeypatch, caplog):
    cases = [make_case(1), make_case(2), make_case(3, classes=(LIVER,))]
    with caplog.at_level(logging.WARNING, logger="test"):
        summary, calls = run(monkeypatch, cases)
    assert (1, 3, SPLEEN) not in calls and len(calls) == 3
    assert "query volume 3 has no spleen" in caplog.text
    spleen = summary["classes"]["spleen"]
    assert math.isnan(summary["supports"][0]["classes"]["spleen"]["per_query"]["3"]["model"]["dice"])
    assert spleen["model"]["dice"] == pytest.approx(0.4)  # query 2 only, not (0.4 + 0) / 2
    assert summary["mean"]["model"]["dice"] == pytest.approx((5 / 6 + 0.4) / 2)


def test_support_without_a_class_is_refused_before_any_work(monkeypatch):
    cases = [make_case(1), make_case(2, classes=(LIVER,)), make_case(3)]
    with pytest.raises(ValueError, match=r"support volume 2 \(image_2.nii.gz\) has no spleen \(4\)") as info:
        run(monkeypatch, cases, rotate_support=True)  # support 2 comes second in the rotation
    assert "\n" not in str(info.value)
    calls = []
    monkeypatch.setattr(ep1_fold, "predict_query", fake_predict(calls))
    with pytest.raises(ValueError):
        evaluate_fold(None, cases, SPEC, options(rotate_support=True), CPU)
    assert calls == []


def test_label_maps_merge_by_highest_probability(monkeypatch, tmp_path):
    paths = {}
    for cid in (1, 2):
        paths[cid] = tmp_path / f"image_{cid}.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 4), np.float32)), str(paths[cid]))
    cases = [make_case(cid, image_path=paths[cid]) for cid in (1, 2)]
    # both classes predicted on slice 0 of query 2: voxel 0 liver 0.7 < spleen 0.9; voxel 1 liver 0.8 >
    # spleen 0.4 (not above 0.5 anyway); voxel 2 both 0.3 (background); voxel 3 spleen only 0.6
    probs = {LIVER: [0.7, 0.8, 0.3, 0.0], SPLEEN: [0.9, 0.4, 0.3, 0.6]}

    def predict(model, support, query, label, *args, **kwargs):
        prob = np.zeros((1, 4, 4), np.float32)
        prob[0, 0] = probs[label]
        target = np.zeros((1, 4, 4), np.uint8)
        target[0, 0] = 1
        return {"slices": np.array([0]), "prob": prob, "copy": target, "target": target}

    monkeypatch.setattr(ep1_fold, "predict_query", predict)
    evaluate_fold(None, cases, SPEC, options(), CPU, tmp_path / "out")
    merged = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "predictions" / "query_2.nii.gz")))
    assert merged[0, 0].tolist() == [SPLEEN, LIVER, 0, SPLEEN]
    assert not merged[1].any() and not merged[0, 1:].any()


def test_checkpoint_of_another_fold_is_refused():
    from dataloaders.dataset_specifics import get_dataset_spec
    from dataloaders.folds import split_fold

    spec = get_dataset_spec("CHAOST2")
    train1, test1 = split_fold(spec.case_ids, spec, 1)
    _, test0 = split_fold(spec.case_ids, spec, 0)
    state = {"fold": {"dataset": "CHAOST2", "setting": 1, "eval_fold": 1, "train_ids": train1, "test_ids": test1},
             "config": {"n_steps": 10}, "step": 10}
    # fold 1 = positions 4-8; it trained on positions 0-3 = ids 1, 2, 3, 5 of evaluation fold 0 = [1, 2, 3, 5, 8]
    with pytest.raises(ValueError, match=r"trained on CHAOST2 fold 1, whose training volumes \[1, 2, 3, 5\] are in "
                                          r"evaluation fold 0; use eval_fold=1") as info:
        check_checkpoint(state, "CHAOST2", 0, "", test0, "c.pth")
    assert "\n" not in str(info.value)
    check_checkpoint(state, "CHAOST2", 1, "", test1, "c.pth")


def test_older_checkpoint_without_ids_is_checked_through_its_config(caplog):
    from dataloaders.dataset_specifics import get_dataset_spec
    from dataloaders.folds import split_fold

    spec = get_dataset_spec("CHAOST2")
    state = {"config": {"dataset": "CHAOST2", "eval_fold": 2, "n_steps": 35000}, "step": 5000}  # no "fold"
    assert checkpoint_training_ids(state, "CHAOST2", "") == (
        "CHAOST2", 2, split_fold(spec.case_ids, spec, 2)[0])
    _, test0 = split_fold(spec.case_ids, spec, 0)
    with pytest.raises(ValueError, match=r"fold 2, whose training volumes \[1, 2, 3, 5, 8\] are in evaluation fold 0"):
        check_checkpoint(state, "CHAOST2", 0, "", test0, "old.pth")
    _, test2 = split_fold(spec.case_ids, spec, 2)
    with caplog.at_level(logging.WARNING, logger="test"):
        check_checkpoint(state, "CHAOST2", 2, "", test2, "old.pth")
    assert "stopped after 5000 of 35000 training steps" in caplog.text


def test_summarize_skips_undefined_folds():
    from test_summarize import fake_result, load_summarize

    results = [fake_result(0, 0.8, 0.4, 0.3), fake_result(1, 0.6, float("nan"), 0.3), fake_result(2, 0.4, 0.8, 0.3)]
    table = load_summarize().summarize_group(results)["classes"]
    assert table["liver"]["dice_mean"] == pytest.approx(0.6)
    assert table["liver"]["dice_std"] == pytest.approx(math.sqrt(0.08 / 2))  # sample std (ddof 1) over 3 folds
    assert table["spleen"]["dice_mean"] == pytest.approx(0.6) and table["spleen"]["n_folds"] == 2


def test_means_and_spread_over_supports_by_hand():
    from evaluation.scores import nanmean, nanstd, sample_std, summarize_supports

    assert nanmean([0.2, math.nan, 0.6]) == pytest.approx(0.4) and math.isnan(nanmean([math.nan]))
    assert nanstd([0.2, math.nan, 0.6]) == pytest.approx(0.2) and math.isnan(nanstd([]))
    # over folds and seeds: ddof 1, sqrt(((0.2 - 0.4)^2 + (0.6 - 0.4)^2) / 1)
    assert sample_std([0.2, 0.6]) == pytest.approx(0.08 ** 0.5) and sample_std([0.7]) == 0.0
    assert math.isnan(sample_std([]))

    def scores(dice, recall):
        return {"dice": dice, "iou": dice / 2, "precision": 1.0, "recall": recall}

    runs = [  # two supports, two classes; the baseline differs from the model in every number
        {"classes": {"liver": {"model": scores(0.8, 0.9), "copy_support": scores(0.5, 0.4)},
                     "spleen": {"model": scores(0.4, 0.3), "copy_support": scores(0.1, 0.2)}},
         "mean": {"model": scores(0.6, 0.6), "copy_support": scores(0.3, 0.3)}},
        {"classes": {"liver": {"model": scores(0.6, 0.7), "copy_support": scores(0.3, 0.2)},
                     "spleen": {"model": scores(math.nan, math.nan), "copy_support": scores(0.1, 0.0)}},
         "mean": {"model": scores(0.6, 0.7), "copy_support": scores(0.2, 0.1)}},
    ]
    out = summarize_supports(runs)
    assert out["classes"]["liver"]["model"]["dice"] == pytest.approx(0.7)
    assert out["classes"]["liver"]["model"]["recall"] == pytest.approx(0.8)
    assert out["classes"]["liver"]["copy_support"]["dice"] == pytest.approx(0.4)
    assert out["classes"]["liver"]["dice_std_over_supports"] == pytest.approx(0.1)
    assert out["classes"]["spleen"]["model"]["dice"] == pytest.approx(0.4)  # the undefined support left out
    assert out["classes"]["spleen"]["dice_std_over_supports"] == 0.0
    assert out["mean"]["model"]["recall"] == pytest.approx(0.65)
    assert out["mean"]["copy_support"]["dice"] == pytest.approx(0.25)
    assert out["mean"]["dice_std_over_supports"] == 0.0


def test_a_checkpoint_whose_config_describes_no_model_is_named(tmp_path):
    from models.fewshot import FewShotSeg

    path = tmp_path / "odd.pth"
    with pytest.raises(ValueError, match=r"odd.pth: the checkpoint's config does not describe a model: .*resnet7"):
        FewShotSeg.from_checkpoint({"backbone": "resnet7", "dmap_mode": "learned", "temperature": 0.05,
                                    "fixed_threshold": 0.9, "alpha": 10.0}, path, state={"model": {}})
    with pytest.raises(ValueError, match=r"odd.pth: the checkpoint's config does not describe a model: 'backbone'"):
        FewShotSeg.from_checkpoint({}, path, state={"model": {}})
