"""predict: scans of any grid into model space and back, EP1 correspondence, CLI errors.

The geometry tests use a stub model that copies the support mask (or thresholds the query), so they check
the resample / reorient / crop / inverse chain without a network.
"""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import predict as cli
from dataloaders.dataset_specifics import get_dataset_spec
from dataloaders.preprocess import resample_image, resample_label
from inference.model_space import model_slice_range, read_scan, to_model_space, to_original_grid
from inference.predict import Predictor, fuse_labels, predict_query, segment_label
from util.metrics import segmentation_scores

SYNTH = get_dataset_spec("SYNTH")  # model space: LAS, 2.5 x 2.5 x 6.5 mm, 128 x 128
LAS = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


class CopySupport:
    """Predicts every query slice as the support mask."""

    def encode_support(self, image, mask):
        assert image.shape[1] == 3 and mask.shape == (1, *image.shape[-2:])
        return mask

    def segment(self, mask, query):
        m = mask.expand(query.shape[0], -1, -1)
        return torch.stack([1 - m, m], dim=1), {}


class Bright:
    """Predicts the voxels brighter than 1.5 (z-scored): the phantom's organ."""

    def encode_support(self, image, mask):
        return None

    def segment(self, _, query):
        m = (query[:, 0] > 1.5).float()
        return torch.stack([1 - m, m], dim=1), {}


def _stub(model, **kw):
    return Predictor(model=model, spec=SYNTH, device=torch.device("cpu"), **kw)


def _phantom():
    """Support volume [16, 60, 150] at 2.5 x 2.5 x 6.5 mm (LAS): a textured body, an off-centre elliptic
    cylinder (label 1, slices 4-11) and a small box (label 2, slices 6-9) on the other side."""
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[0:16, 0:60, 0:150]
    image = rng.normal(0.0, 0.1, (16, 60, 150)).astype(np.float32) + 0.5
    label = np.zeros((16, 60, 150), np.uint8)
    label[(((y - 20) / 9.0) ** 2 + ((x - 100) / 15.0) ** 2 < 1) & (z >= 4) & (z <= 11)] = 1
    label[(y >= 35) & (y < 47) & (x >= 30) & (x < 44) & (z >= 6) & (z <= 9)] = 2
    image[label > 0] += 4.0
    img = sitk.GetImageFromArray(image)
    img.SetSpacing((2.5, 2.5, 6.5))
    img.SetDirection(LAS)
    img.SetOrigin((-180.0, 70.0, -40.0))
    lab = sitk.GetImageFromArray(label)
    lab.CopyInformation(img)
    return img, lab


def _pad(img, before, after, value):
    arr = np.pad(sitk.GetArrayFromImage(img), [(b, a) for b, a in zip(before[::-1], after[::-1])],
                 constant_values=value)
    out = sitk.GetImageFromArray(arr)
    out.SetSpacing(img.GetSpacing())
    out.SetDirection(img.GetDirection())
    out.SetOrigin(img.TransformIndexToPhysicalPoint([-b for b in before]))
    return out


def _query(img, lab):
    """The phantom resampled to 1.7 x 1.9 x 3 mm, flipped to RPI and padded: (image, label).

    The padding is the same on both sides: the model-space volumes are centre crops, and a model that copies
    the support mask pixel for pixel can only be right when the anatomy sits at the same place in both.
    """
    img = sitk.DICOMOrient(resample_image(img, (1.7, 1.9, 3.0)), "RPI")
    lab = sitk.DICOMOrient(resample_label(lab, (1.7, 1.9, 3.0)), "RPI")
    return _pad(img, (5, 9, 2), (5, 9, 2), 0.0), _pad(lab, (5, 9, 2), (5, 9, 2), 0)


@pytest.fixture(scope="module")
def volumes():
    img, lab = _phantom()
    q_img, q_lab = _query(img, lab)
    support = to_model_space(img, SYNTH, "mr", lab, name="support")
    query = to_model_space(q_img, SYNTH, "mr", name="query")
    return img, lab, q_img, q_lab, support, query


def _extent(label_img, value):
    arr = sitk.GetArrayViewFromImage(label_img)
    zs = np.flatnonzero((arr == value).reshape(arr.shape[0], -1).any(axis=1))
    return int(zs[0]), int(zs[-1])


def test_model_space_records_the_training_layout(volumes):
    _, _, q_img, _, _, query = volumes
    assert query.image.shape[1:] == (128, 128) and query.image.dtype == np.float32
    assert query.grid.GetSpacing() == pytest.approx((2.5, 2.5, 6.5))
    assert query.grid.GetDirection() == pytest.approx(LAS)
    assert abs(float(query.image.mean())) < 1e-4 and float(query.image.std()) == pytest.approx(1.0, abs=1e-3)
    assert q_img.GetDirection() != pytest.approx(LAS)  # the query really was stored otherwise
    assert any("reoriented to LAS" in s for s in query.steps) and any("crop/pad" in s for s in query.steps)


def test_copy_model_recovers_the_organ_on_the_query_grid(volumes):
    """Whole chain: the query (another spacing, flipped, padded) back on its own grid, Dice > 0.9."""
    _, _, q_img, q_lab, support, query = volumes
    truth = sitk.GetArrayFromImage(q_lab)
    ranges = [_extent(q_lab, 1), _extent(q_lab, 2)]
    result = predict_query(_stub(CopySupport()), support, query, [1, 2], ranges, name="query")
    seg = result["segmentation"]
    assert seg.shape == truth.shape == tuple(reversed(q_img.GetSize()))
    # the box spans only 4 model slices (26 mm): partial volume at its two ends costs it most
    for value, bound in ((1, 0.9), (2, 0.8)):
        dice = segmentation_scores((seg == value).astype(np.uint8), (truth == value).astype(np.uint8))["dice"]
        print(f"label {value}: Dice {dice:.3f}")
        assert dice > bound, (value, dice)
        assert result["labels"][value]["source"] == "given"
        assert result["labels"][value]["voxels"] == int((seg == value).sum())
    assert set(np.unique(seg)) == {0, 1, 2}


def test_a_flip_is_not_hidden_by_the_chain(volumes):
    """Control: the same prediction mirrored left-right no longer matches (the bound above means something)."""
    _, _, _, q_lab, support, query = volumes
    result = predict_query(_stub(CopySupport()), support, query, [1], [_extent(q_lab, 1)])
    truth = (sitk.GetArrayFromImage(q_lab) == 1).astype(np.uint8)
    mirrored = result["segmentation"][:, :, ::-1]
    assert segmentation_scores((mirrored == 1).astype(np.uint8), truth)["dice"] < 0.2


def test_estimated_extent_follows_the_organ(volumes):
    _, _, _, q_lab, support, query = volumes
    res = segment_label(_stub(Bright()), support, query, 1)
    assert res.source == "estimated"
    first, last = model_slice_range(query, *_extent(q_lab, 1))
    # the box (label 2) is bright too but its run of slices covers less area than the cylinder's
    assert abs(res.extent[0] - first) <= 1 and abs(res.extent[1] - last) <= 1
    assert len(res.support_slices) == 3


def test_to_original_grid_returns_a_constant_volume_unchanged(volumes):
    _, _, q_img, _, _, query = volumes
    back = to_original_grid(np.full(query.image.shape, 0.25, np.float32), query)
    assert back.shape == tuple(reversed(q_img.GetSize())) == (39, 97, 231)
    # x: 231 x 1.7 = 393 mm > 128 x 2.5 = 320 mm, so about 21 columns per side were cropped away (0);
    # y (184 mm) was padded and z is covered to its ends: every other voxel gets the value back
    assert np.allclose(back[:, :, 25:-25], 0.25)
    assert np.allclose(back[:, :, :18], 0.0) and np.allclose(back[:, :, -18:], 0.0)


def test_fuse_labels_takes_the_most_probable_label_above_half():
    a = np.array([0.9, 0.6, 0.4, 0.7], np.float32)
    b = np.array([0.2, 0.8, 0.3, 0.7], np.float32)
    assert fuse_labels([a, b], [3, 300]).tolist() == [3, 300, 0, 3]
    assert fuse_labels([a], [5]).dtype == np.uint8 and fuse_labels([a, b], [3, 300]).dtype == np.uint16


# ----------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def files(tmp_path_factory, volumes):
    img, lab, q_img, q_lab, _, _ = volumes
    d = tmp_path_factory.mktemp("scans")
    paths = {"support": d / "support.nii.gz", "support_label": d / "support_label.nii.gz",
             "query": d / "query.nii.gz", "query_label": d / "query_label.nii.gz"}
    sitk.WriteImage(img, str(paths["support"]))
    sitk.WriteImage(sitk.Cast(lab, sitk.sitkUInt8), str(paths["support_label"]))
    sitk.WriteImage(q_img, str(paths["query"]))
    sitk.WriteImage(sitk.Cast(q_lab, sitk.sitkUInt8), str(paths["query_label"]))
    return paths


def _args(files, out, *extra):
    return ["--checkpoint", str(files.get("checkpoint", "ckpt.pth")), "--support-image", str(files["support"]),
            "--support-label", str(files["support_label"]), "--query", str(files["query"]),
            "--out-dir", str(out), *extra]


def test_cli_writes_the_segmentation_on_the_query_grid(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_predictor", lambda *a, **k: _stub(CopySupport()))
    q0, q1 = _extent(sitk.ReadImage(str(files["query_label"])), 1)
    out = tmp_path / "out"
    assert cli.main(_args(files, out, "--labels", "1", "--query-range", str(q0), str(q1), "--save-probs")) == 0
    seg, ref = sitk.ReadImage(str(out / "query_seg.nii.gz")), sitk.ReadImage(str(files["query"]))
    assert seg.GetSize() == ref.GetSize() and seg.GetSpacing() == ref.GetSpacing()
    assert seg.GetOrigin() == pytest.approx(ref.GetOrigin(), abs=1e-4)
    assert seg.GetDirection() == pytest.approx(ref.GetDirection())
    assert (out / "query_prob_1.nii.gz").is_file() and len(list((out / "query_overlays").glob("*.png"))) == 3
    report = json.loads((out / "query_seg.json").read_text())
    assert report["labels"]["1"]["source"] == "given" and report["labels"]["1"]["slice_range"] == [q0, q1]
    line = capsys.readouterr().out
    assert "query:" in line and f"slices {q0}-{q1} (given)" in line


@pytest.mark.parametrize("change, message", [
    (lambda f, d: ["--labels", "3"], "support_label.nii.gz: no voxel with label 3 (values present: 0, 1, 2)"),
    (lambda f, d: ["--labels", "1", "--modality", "pet"], "--modality: unknown modality 'pet'; expected one of mr, ct"),
    (lambda f, d: ["--labels", "1", "--support-label", str(d["shifted"])], "shifted.nii.gz: label origin"),
    (lambda f, d: ["--labels", "1", "--support-label", str(d["small"])], "small.nii.gz: label size"),
    (lambda f, d: ["--labels", "1", "--query", str(d["flat"])], "flat.nii.gz: expected a 3-D scalar volume"),
    (lambda f, d: ["--labels", "1", "--query", str(d["missing"])], "missing.nii.gz: file not found"),
    (lambda f, d: ["--labels", "1", "1"], "--labels: expected distinct values"),
    (lambda f, d: ["--labels", "1", "--amp", "fp8"], "--amp: unknown mode 'fp8'; expected one of auto, off, bf16"),
    (lambda f, d: ["--labels", "1", "--query-range", "0", "999"], "query.nii.gz: slice range 0 999 is not within"),
])
def test_cli_bad_input_one_line_nothing_written(files, tmp_path, monkeypatch, capsys, change, message):
    monkeypatch.setattr(cli, "load_predictor", lambda *a, **k: _stub(CopySupport()))
    lab = sitk.ReadImage(str(files["support_label"]))
    bad = {"shifted": tmp_path / "shifted.nii.gz", "small": tmp_path / "small.nii.gz",
           "flat": tmp_path / "flat.nii.gz", "missing": tmp_path / "missing.nii.gz"}
    shifted = sitk.Image(lab)
    shifted.SetOrigin(tuple(o + 5.0 for o in lab.GetOrigin()))
    sitk.WriteImage(shifted, str(bad["shifted"]))
    sitk.WriteImage(lab[:, :, :3][:-1, :, :], str(bad["small"]))
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkFloat32), str(bad["flat"]))
    out = tmp_path / "out"
    args = _args(files, out)
    extra = change(files, bad)
    for flag in ("--support-label", "--query"):  # a flag in extra replaces the default one
        if flag in extra:
            i = args.index(flag)
            args[i + 1] = extra[extra.index(flag) + 1]
            del extra[extra.index(flag):extra.index(flag) + 2]
    assert cli.main(args + extra) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err
    assert message in err.split("error: ")[1].splitlines()[0]
    assert not out.exists()


def test_cli_checkpoint_from_another_backbone(files, tmp_path, capsys):
    from config import build_config
    from models.fewshot import FewShotSeg

    cfg = build_config(["demo"])  # resnet18
    state = {"model": FewShotSeg.from_config(cfg["model"]).state_dict(),
             "config": dict(cfg, model=dict(cfg["model"], backbone="resnet34"))}
    torch.save(state, tmp_path / "other.pth")
    out = tmp_path / "out"
    assert cli.main(_args(dict(files, checkpoint=tmp_path / "other.pth"), out, "--labels", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert "other.pth does not fit this model" in err and "model.backbone" in err and "\n" not in err
    torch.save({"model": state["model"]}, tmp_path / "bare.pth")
    assert cli.main(_args(dict(files, checkpoint=tmp_path / "bare.pth"), out, "--labels", "1")) == 2
    assert "bare.pth: no training config in the checkpoint" in capsys.readouterr().err
    assert not out.exists()


def test_cli_real_model_runs_at_a_configured_image_size(files, tmp_path, capsys):
    """A random-init ResNet-18 checkpoint with image_size 64: runs, estimates the extent, query grid kept."""
    from config import build_config
    from models.fewshot import FewShotSeg

    cfg = dict(build_config(["demo"]), image_size=64)
    torch.manual_seed(0)
    torch.save({"model": FewShotSeg.from_config(cfg["model"]).state_dict(), "config": cfg}, tmp_path / "r18.pth")
    out = tmp_path / "out"
    status = cli.main(_args(dict(files, checkpoint=tmp_path / "r18.pth"), out, "--labels", "1", "2",
                            "--amp", "off", "--device", "cpu", "--overlays", "1"))
    assert status == 0, capsys.readouterr().err
    seg = sitk.ReadImage(str(out / "query_seg.nii.gz"))
    assert seg.GetSize() == read_scan(files["query"]).GetSize()
    report = json.loads((out / "query_seg.json").read_text())
    assert {report["labels"][k]["source"] for k in ("1", "2")} <= {"estimated", "not found"}
    import hashlib

    checkpoint = report["provenance"]["checkpoint"]
    assert checkpoint["sha256"] == hashlib.sha256((tmp_path / "r18.pth").read_bytes()).hexdigest()
    assert checkpoint["weights"] == "raw" and checkpoint["path"] == str(tmp_path / "r18.pth")
