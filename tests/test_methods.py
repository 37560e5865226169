"""Methods as bundles of components (models/components.py, models/methods.py): closed forms, gradients,
the distinguishing component of each method, checkpoints, config, and DMAP unchanged."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from config import ConfigError, build_config, resolve_config
from models.components import (METHOD_DEFAULTS, Components, assignment_scores, class_prototype_sets,
                               local_prototypes, offset_probability, refine_prototypes, resolve_components)
from models.fewshot import FewShotSeg
from models.losses import clamped_log, episode_loss, episode_nll
from models.methods import MethodSeg, MethodSupportEncoding, PathSupport

pytestmark = pytest.mark.filterwarnings("ignore:Encoder.*randomly initialised:UserWarning")

SIZE = 40
MODEL = {"backbone": "resnet18", "weights_path": "", "dmap_mode": "learned", "temperature": 0.05,
         "fixed_threshold": 0.9, "alpha": 10.0}
METHODS = ("adnet", "qnet", "alpnet")


def _model(method="dmap", seed=0, **keys) -> FewShotSeg:
    torch.manual_seed(seed)
    return FewShotSeg.from_config(dict(MODEL, method=method, **keys))


def _episode(b=2, s=1, q=2, size=SIZE, seed=1):
    g = torch.Generator().manual_seed(seed)
    si = torch.randn(b, s, 3, size, size, generator=g)
    qi = torch.randn(b, q, 3, size, size, generator=g)
    sm = torch.zeros(b, s, size, size)
    sm[..., 8:26, 10:30] = 1
    qm = torch.zeros(b, q, size, size, dtype=torch.long)
    qm[..., 12:30, 6:26] = 1
    return si, sm, qi, qm


# ---------------------------------------------------------------------------------------------- DMAP unchanged
# (loss, sum of the training logits log(p_fg / p_bg), sum of the evaluation logits, |grad| of the 1x1 reduction,
# sum of xi, kept fraction), computed by the code before methods existed
DMAP_REFERENCE = {
    "learned": (3.551913261413574, 36449.59375, 24556.048828125, 2.123251438140869, 2.0019338130950928,
                0.994957447052002),
    "fixed": (3.393181562423706, 34875.16015625, 24480.9296875, 2.2463302612304688, 3.5999999046325684,
              0.5041666626930237),
    "off": (3.552208423614502, 36452.0859375, 24556.048828125, 2.121371269226074, -4.0, 1.0),
}


def _dmap_numbers(model: FewShotSeg) -> list[float]:
    si, sm, qi, qm = _episode()
    model.train()
    probs, aux = model(si, sm, qi)
    loss = model.training_loss(probs, aux, qm, 0.7, (0.5, 1.0))
    loss.backward()
    model.eval()
    with torch.no_grad():
        evaluated, _ = model.segment(model.encode_support(si[1], sm[1]), qi[1])

    def logits(p):
        return torch.log(p[:, :, 1] / p[:, :, 0]).sum().item()

    return [loss.item(), logits(probs), logits(evaluated[None]), model.encoder.reduce.weight.grad.norm().item(),
            aux["xi"].sum().item(), aux["kept_fraction"].item()]


@pytest.mark.parametrize("mode", ["learned", "fixed", "off"])
def test_dmap_is_unchanged(mode):
    cfg = resolve_config(build_config(updates={"model": dict(MODEL, dmap_mode=mode)}), need_data=False)
    assert cfg["loss"]["class_weights"] == [0.1, 1.0] and cfg["model"]["method"] == "dmap"
    torch.manual_seed(3)
    model = FewShotSeg.from_config(cfg["model"])
    assert type(model) is FewShotSeg
    assert _dmap_numbers(model) == pytest.approx(DMAP_REFERENCE[mode], rel=2e-5, abs=1e-6)
    assert model.state_dict().keys() == FewShotSeg(backbone="resnet18", dmap_mode=mode).state_dict().keys()


@pytest.mark.parametrize("mode", ["learned", "fixed", "off"])
def test_methodseg_with_dmap_components_is_fewshotseg(mode):
    torch.manual_seed(3)
    plain = FewShotSeg(backbone="resnet18", dmap_mode=mode)
    torch.manual_seed(3)
    bundled = MethodSeg(Components(), backbone="resnet18", dmap_mode=mode)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, bundled.state_dict()[key]), key
    assert bundled.state_dict().keys() == plain.state_dict().keys()
    si, sm, qi, _ = _episode()
    for train in (True, False):
        plain.train(train), bundled.train(train)
        with torch.no_grad():
            ref, ref_aux = plain(si, sm, qi)
            out, aux = bundled(si, sm, qi)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch.testing.assert_close(aux["xi"], ref_aux["xi"], rtol=0, atol=0)
        torch.testing.assert_close(aux["tau"], ref_aux["tau"], rtol=0, atol=0)


def test_map_pooling_equals_dmap_off():
    torch.manual_seed(3)
    off = FewShotSeg(backbone="resnet18", dmap_mode="off").eval()
    torch.manual_seed(3)
    mapped = MethodSeg(Components(pooling="map"), backbone="resnet18").eval()
    mapped.load_state_dict({k: v for k, v in off.state_dict().items() if not k.startswith("ltg.")})
    si, sm, qi, _ = _episode()
    with torch.no_grad():
        torch.testing.assert_close(mapped(si, sm, qi)[0], off(si, sm, qi)[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- components
def test_resolve_components_defaults_and_overrides():
    assert resolve_components({}) == Components()  # configs from before methods existed are DMAP
    assert Components().is_plain_dmap and not resolve_components({"method": "adnet"}).is_plain_dmap
    for method, defaults in METHOD_DEFAULTS.items():
        c = resolve_components({"method": method})
        assert {k: getattr(c, k) for k in defaults} == defaults
    q = resolve_components({"method": "qnet", "refine_iters": 0, "fusion_weight": 1})
    assert (q.paths, q.refine_iters, q.fusion_weight) == ("layer3+layer4", 0, 1.0)
    assert not resolve_components({"method": "dmap", "paths": "layer3+layer4"}).is_plain_dmap


@pytest.mark.parametrize("keys,named", [
    ({"method": "panet"}, "model.method"),
    ({"method": "adnet", "head": "sigmoid"}, "model.head"),
    ({"method": "adnet", "pooling": "local"}, "model.pooling"),
    ({"method": "alpnet", "pooling": "dmap"}, "model.pooling"),
    ({"method": "alpnet", "refine_iters": 3}, "model.refine_iters"),
    ({"method": "qnet", "threshold_loss_weight": 1.0}, "model.threshold_loss_weight"),
    ({"method": "qnet", "fusion_weight": 1.5}, "model.fusion_weight"),
    ({"method": "alpnet", "local_window": 0}, "model.local_window"),
    ({"method": "qnet", "refine_iters": -1}, "model.refine_iters"),
])
def test_bad_components_are_one_line_config_errors(keys, named):
    with pytest.raises(ValueError, match=named) as info:
        resolve_components(keys)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=named):
        resolve_config(build_config(updates={"model": dict(MODEL, **keys)}), need_data=False)


def test_config_records_the_components_and_the_methods_class_weights():
    cfg = resolve_config(build_config(updates={"model": {"method": "alpnet"}}), need_data=False)
    assert cfg["model"]["pooling"] == "local" and cfg["model"]["head"] == "assign"
    assert cfg["loss"]["class_weights"] == [0.05, 1.0]
    cfg = resolve_config(build_config(["cpu"], {"model": {"method": "qnet"}}), need_data=False)
    assert cfg["loss"]["class_weights"] == [0.5, 1.0] and cfg["model"]["refine_iters"] == 7
    with pytest.raises(ConfigError, match="loss.class_weights"):
        resolve_config(build_config(updates={"loss": {"class_weights": [1.0]}}), need_data=False)


def test_adnet_probability_closed_form():
    cos = torch.tensor([[[[0.5, 1.0], [-0.2, 0.0]]]])
    t = -10.0
    got = offset_probability(cos, torch.full((1, 1), t), alpha=10.0)
    adnet = 1.0 - torch.sigmoid(0.5 * (-20.0 * cos - t))      # ADNet: S = -20 cos, p = 1 - sigmoid(0.5 (S - T))
    torch.testing.assert_close(got, adnet)
    assert got[0, 0, 0, 0].item() == pytest.approx(0.5)       # S = T
    assert got[0, 0, 0, 1].item() == pytest.approx(1 / (1 + math.exp(-5)))


def test_adnet_model_predicts_with_its_learned_threshold():
    model = _model("adnet").eval()
    with torch.no_grad():
        model.threshold.fill_(-4.0)
    si, sm, qi, _ = _episode(b=1)
    captured = {}

    def keep_features(module, args, out):
        captured["f"] = out["features"]

    model.encoder.register_forward_hook(keep_features)
    with torch.no_grad():
        probs, aux = model(si[0], sm[0], qi[0])
    feats = captured["f"]                                          # [S + Q, C, h, w]
    up = F.interpolate(feats[:1], size=(SIZE, SIZE), mode="bilinear", align_corners=True)[0]
    prototype = up[:, sm[0, 0] > 0].mean(1)                        # MAP of the upsampled features
    cos = F.cosine_similarity(feats[1:], prototype[None, :, None, None], dim=1)
    p = 1.0 - torch.sigmoid(0.5 * (-20.0 * cos - (-4.0)))
    expected = F.interpolate(p[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=True)[:, 0]
    torch.testing.assert_close(probs[:, 1], expected, rtol=1e-4, atol=1e-5)
    assert aux["threshold"].item() == -4.0 and "tau" not in aux


def test_adnet_loss_is_nll_plus_alignment_plus_threshold_over_20():
    model = _model("adnet").train()
    si, sm, qi, qm = _episode()
    probs, aux = model(si, sm, qi)
    loss = model.training_loss(probs, aux, qm, 0.7, (0.1, 1.0))
    nll = episode_nll(clamped_log(probs), qm, (0.1, 1.0))
    expected = nll + aux["align_loss"] + model.threshold / 20
    torch.testing.assert_close(loss, expected)
    assert aux["align_loss"].item() > 0
    by_classes = model.training_loss(probs, dict(aux), qm, 0.7, (0.1, 1.0), normalize="classes")
    torch.testing.assert_close(by_classes, episode_nll(clamped_log(probs), qm, (0.1, 1.0), normalize="classes")
                               + aux["align_loss"] + model.threshold / 20)
    assert abs(by_classes.item() - loss.item()) > 1e-4  # the switch reaches the NLL
    # the threshold loss is there: T's gradient carries its 1/20 (dropping it would change T's gradient)
    loss.backward()
    with_term = model.threshold.grad.item()
    model.zero_grad()
    probs, aux = model(si, sm, qi)
    (model.training_loss(probs, aux, qm, 0.7, (0.1, 1.0)) - model.threshold / 20).backward()
    assert with_term - model.threshold.grad.item() == pytest.approx(1 / 20, rel=1e-4)
    off = MethodSeg(resolve_components({"method": "adnet", "threshold_loss_weight": 0.0}), backbone="resnet18")
    off.load_state_dict(model.state_dict())
    off.train()
    probs, aux = off(si, sm, qi)
    assert off.training_loss(probs, aux, qm).item() != pytest.approx(loss.item())


def test_query_loss_switch():
    model = _model("adnet", query_loss="focal").train()
    si, sm, qi, qm = _episode()
    probs, aux = model(si, sm, qi)
    expected = episode_loss(probs, qm, 0.7, (0.1, 1.0)) + aux["align_loss"] + model.threshold / 20
    torch.testing.assert_close(model.training_loss(probs, aux, qm, 0.7, (0.1, 1.0)), expected)


def _with_weights(method_keys: dict, source: torch.nn.Module) -> MethodSeg:
    model = MethodSeg(resolve_components(method_keys), backbone="resnet18")
    model.load_state_dict(source.state_dict())
    return model.eval()


def test_qnet_fusion_weight_one_is_its_layer3_path_and_the_layer4_path_counts():
    base = _model("qnet", refine_iters=0).eval()
    assert isinstance(base.reduce4, torch.nn.Conv2d) and base.reduce4.weight.shape[:2] == (512, 512)
    assert base.reduce4.bias is None
    a1 = _with_weights({"method": "qnet", "refine_iters": 0, "fusion_weight": 1.0}, base)
    a0 = _with_weights({"method": "qnet", "refine_iters": 0, "fusion_weight": 0.0}, base)
    layer3 = MethodSeg(resolve_components({"method": "qnet", "refine_iters": 0, "paths": "layer3"}),
                       backbone="resnet18")
    layer3.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("reduce4.")})
    layer3.eval()
    si, sm, qi, _ = _episode()
    with torch.no_grad():
        p = {name: m(si, sm, qi)[0][:, :, 1] for name, m in
             (("base", base), ("a1", a1), ("a0", a0), ("layer3", layer3))}
    torch.testing.assert_close(p["a1"], p["layer3"], rtol=0, atol=1e-6)
    torch.testing.assert_close(p["base"], 0.9 * p["a1"] + 0.1 * p["a0"], rtol=1e-5, atol=1e-6)
    assert (p["a0"] - p["a1"]).abs().max() > 1e-3  # the layer4 path predicts something else


def test_qnet_layer4_path_learns():
    model = _model("qnet").train()
    si, sm, qi, qm = _episode()
    probs, aux = model(si, sm, qi)
    model.training_loss(probs, aux, qm).backward()
    assert model.reduce4.weight.grad is not None and model.reduce4.weight.grad.abs().sum() > 0
    assert model.encoder.tau_head.weight.grad.abs().sum() > 0 and "tau" in aux


def test_refinement_moves_the_prototype_to_the_predicted_foreground():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 4, 6, 6, generator=g)
    fg = torch.zeros(2, 6, 6, dtype=torch.bool)
    fg[:, 1:4, 2:5] = True
    target = torch.tensor([1.5, -0.5, 0.8, 0.2])
    feats[:, :, 1:4, 2:5] = target[:, None, None]                 # every predicted-foreground feature is target
    start = torch.zeros(2, 4)
    fg[1] = False                                                  # image 1: nothing predicted, nothing moves
    assert torch.equal(refine_prototypes(feats, start, fg, 0, 0.01), start)
    few = refine_prototypes(feats, start, fg, 7, 0.01)
    many = refine_prototypes(feats, start, fg, 400, 0.05)
    assert torch.equal(few[1], start[1]) and torch.equal(many[1], start[1])
    d0, d7, d400 = ((p[0] - target).norm().item() for p in (start, few, many))
    assert d400 < d7 < d0 and d400 < 0.05
    # 7 Adam steps of lr 0.01 move each coordinate by about 7 x 0.01 at most
    assert 0 < (few[0] - start[0]).abs().max().item() <= 1.5 * 7 * 0.01


def test_refinement_runs_under_inference_mode_and_only_in_evaluation():
    model = _model("qnet").eval()
    plain = _with_weights({"method": "qnet", "refine_iters": 0}, model)
    si, sm, qi, _ = _episode(b=1)
    with torch.inference_mode():
        enc = model.encode_support(si[0], sm[0])
        refined, _ = model.segment(enc, qi[0])
        unrefined, _ = plain.segment(plain.encode_support(si[0], sm[0]), qi[0])
    assert torch.isfinite(refined).all() and (refined - unrefined).abs().max() > 1e-6
    model.train(), plain.train()
    with torch.no_grad():
        torch.testing.assert_close(model(si, sm, qi)[0], plain(si, sm, qi)[0], rtol=0, atol=0)


def test_local_prototypes_and_their_selection_on_a_constructed_map():
    feats = torch.arange(2 * 16, dtype=torch.float64).reshape(1, 1, 2, 4, 4)  # a 4 x 4 map of 2 channels
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.float64)                       # image 8 x 8: 2 px per cell
    mask[..., 0:4, 0:4] = 1      # top-left window entirely inside
    mask[..., 0:4, 4:6] = 1      # top-right window half inside
    mask[..., 4:6, 0:2] = 1      # bottom-left window a quarter inside

    def window_mean(rows, cols):
        return feats[0, 0, :, rows, cols].mean(dim=(1, 2))

    protos, valid = local_prototypes(feats, mask, window=2, threshold=0.95)
    assert valid.tolist() == [[True]]
    torch.testing.assert_close(protos[0, 0], window_mean(slice(0, 2), slice(0, 2)))
    protos, valid = local_prototypes(feats, mask, window=2, threshold=0.4)  # the half window passes too
    torch.testing.assert_close(protos[0], torch.stack([window_mean(slice(0, 2), slice(0, 2)),
                                                       window_mean(slice(0, 2), slice(2, 4))]))
    (bg, bg_valid), (fg, fg_valid) = class_prototype_sets(feats, mask, True, 2, 0.95)
    up = F.interpolate(feats[0], size=(8, 8), mode="bilinear", align_corners=True)[0]
    global_fg = up[:, mask[0, 0] > 0].mean(1)
    torch.testing.assert_close(fg[0], torch.stack([window_mean(slice(0, 2), slice(0, 2)), global_fg]))
    assert fg_valid.tolist() == [[True, True]]
    # background: only the bottom-right window is entirely outside; the global one is kept in reserve
    assert bg_valid.tolist() == [[True, False]]
    torch.testing.assert_close(bg[0, 0], window_mean(slice(2, 4), slice(2, 4)))
    # no window is background enough: the global background prototype stands in
    mostly = torch.ones_like(mask)
    mostly[..., :, 7] = 0                                                      # one image column of background
    (bg, bg_valid), _ = class_prototype_sets(feats, mostly, True, 2, 0.95)
    assert bg_valid.tolist() == [[True]]
    torch.testing.assert_close(bg[0, 0], up[:, :, 7].mean(1))


def test_assignment_scores_closed_form():
    feats = torch.tensor([1.0, 0.0]).reshape(1, 1, 2, 1, 1)
    one = torch.tensor([[[0.6, 0.8]]])
    assert assignment_scores(feats, one, torch.ones(1, 1, dtype=torch.bool), 20.0).item() == pytest.approx(12.0)
    two = torch.tensor([[[0.6, 0.8], [0.0, 1.0], [5.0, 5.0]]])
    valid = torch.tensor([[True, True, False]])                 # the third is padding
    d = torch.tensor([12.0, 0.0])
    expected = (torch.softmax(d, 0) * d).sum().item()
    assert assignment_scores(feats, two, valid, 20.0).item() == pytest.approx(expected)


def test_alpnet_uses_local_prototypes():
    model = _model("alpnet").eval()
    si, sm, qi, _ = _episode(size=64)
    sm[..., 4:60, 4:60] = 1                                        # a support mask with whole windows inside
    with torch.no_grad():
        enc = model.encode_support(si, sm)
        (bg, bg_valid), (fg, fg_valid) = enc.paths[0].sets
        assert fg_valid.sum(1).min().item() > 1                    # local prototypes beside the global one
        probs, aux = model.segment(enc, qi)
        global_only = _with_weights({"method": "alpnet", "pooling": "map"}, model)
        other, _ = global_only(si, sm, qi)
    assert (probs - other).abs().max() > 1e-3
    torch.testing.assert_close(probs.sum(2), torch.ones_like(probs[:, :, 0]))
    assert "tau" not in aux and "threshold" not in aux


# ---------------------------------------------------------------------------------------------- alignment
def _constructed_support(size=8):
    """Features e1 inside the mask, e2 outside (2 channels, float64); the mask covers whole 2 x 2 windows."""
    mask = torch.zeros(1, 1, size, size, dtype=torch.float64)
    mask[..., 2:6, 0:4] = 1
    feats = torch.stack([mask, 1.0 - mask], dim=2)                  # [1, 1, 2, size, size]
    return feats, mask


@pytest.mark.parametrize("method,offset,expected", [
    ("adnet", -10.0, math.log1p(math.exp(-5.0))),      # fg: sigmoid(10 - 5); bg: 1 - sigmoid(0 - 5)
    ("qnet", -10.0, math.log1p(math.exp(-5.0))),       # both paths see the same features: the same number
    ("alpnet", None, math.log1p(math.exp(-20.0))),     # own class scores 20, the other 0
])
def test_alignment_loss_when_the_query_prediction_is_perfect(method, offset, expected):
    model = MethodSeg(resolve_components({"method": method, "local_window": 2}), backbone="resnet18").train()
    feats, mask = _constructed_support()
    paths = [PathSupport(feats, feats.new_zeros(1, 2)) for _ in model.path_names]
    enc = MethodSupportEncoding(features=feats, fg=mask, prototype=feats.new_zeros(1, 2), cosine=None,
                                ltg_support=None, gate=None, batched=True, image_size=(8, 8), paths=paths)
    perfect = torch.stack([1.0 - mask, mask], dim=2)              # the query is the support, predicted exactly
    off = None if offset is None else torch.full((1, 1), offset, dtype=torch.float64)
    loss = model._alignment_loss(enc, [feats] * len(paths), perfect, off)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # no predicted foreground: the episode adds nothing
    empty = torch.stack([torch.ones_like(mask), torch.zeros_like(mask)], dim=2)
    assert model._alignment_loss(enc, [feats] * len(paths), empty, off).item() == 0.0


# ---------------------------------------------------------------------------------------------- every method
@pytest.mark.parametrize("method", METHODS)
def test_forward_backward_reaches_every_learnable_parameter(method):
    model = _model(method).train()
    si, sm, qi, qm = _episode()
    probs, aux = model(si, sm, qi)
    assert probs.shape == (2, 2, 2, SIZE, SIZE) and torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(2), torch.ones(2, 2, SIZE, SIZE))
    loss = model.training_loss(probs, aux, qm, 0.7, (0.1, 1.0))
    loss.backward()
    learnable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert [n for n, p in learnable.items() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in learnable.values())
    frozen = {n.split(".")[2] if n.startswith("encoder.backbone") else n.split(".")[1]
              for n, p in model.named_parameters() if not p.requires_grad}
    expected_frozen = {"adnet": {"layer4", "fc", "tau_head"}, "qnet": set(), "alpnet": {"layer4", "fc", "tau_head"}}
    assert frozen == expected_frozen[method]
    assert model.ltg is None and "log_probs" not in aux and not aux["align_loss"].requires_grad  # left for logging


@pytest.mark.parametrize("method", METHODS)
def test_encode_support_then_segment_equals_forward(method):
    model = _model(method).eval()
    si, sm, qi, _ = _episode(b=1, q=3)
    with torch.no_grad():
        ref, _ = model(si[0], sm[0], qi[0])
        enc = model.encode_support(si[0], sm[0])
        probs, aux = model.segment(enc, qi[0])
        single, _ = model.segment(enc, qi[0, 1:2])
        batched, _ = model.segment(model.encode_support(si, sm), qi)
    torch.testing.assert_close(probs, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(single[0], ref[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched[0], ref, rtol=1e-4, atol=1e-5)
    assert aux["xi"].shape == (3,) and "align_loss" not in aux and "log_probs" not in aux


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_rebuilds_the_method(method, tmp_path):
    cfg = resolve_config(build_config(updates={"model": dict(MODEL, method=method)}), need_data=False)
    model = FewShotSeg.from_config(cfg["model"]).eval()
    torch.save({"model": model.state_dict(), "config": cfg}, tmp_path / "m.pth")
    loaded = FewShotSeg.from_checkpoint(cfg["model"], tmp_path / "m.pth").eval()
    assert type(loaded) is MethodSeg and loaded.method == method and loaded.components == model.components
    si, sm, qi, _ = _episode(b=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(si[0], sm[0], qi[0])[0], model(si[0], sm[0], qi[0])[0])
    with pytest.raises(ValueError, match="does not fit"):  # another method's weights are refused
        other = "qnet" if method != "qnet" else "adnet"
        FewShotSeg.from_checkpoint(dict(cfg["model"], method=other, **{k: None for k in METHOD_DEFAULTS["dmap"]}),
                                   tmp_path / "m.pth")


def test_bf16_autocast_for_every_method():
    si, sm, qi, qm = _episode(b=1, q=1, size=32)
    for method in METHODS:
        model = _model(method).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            probs, aux = model(si, sm, qi)
        loss = model.training_loss(probs, aux, qm)
        loss.backward()
        assert probs.dtype == torch.float32 and torch.isfinite(loss), method


# ---------------------------------------------------------------------------------------------- end to end
class _Recorder:
    """Collects what the training loop logs (as a Sacred run would)."""

    def __init__(self):
        self.scalars: dict[str, list[float]] = {}

    def log_scalar(self, name, value, step):
        self.scalars.setdefault(name, []).append(value)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_evaluates_from_its_checkpoint(method, synth_root, tmp_path):
    import training
    from conftest import smoke_updates
    from test_end_to_end import load_test_script
    from inference.predict import load_predictor
    from util.checkpoints import load_checkpoint

    cfg = resolve_config(build_config(["smoke"], smoke_updates(
        synth_root, tmp_path, n_steps=2, save_snapshot_every=2, image_size=32, test_label=[1], eval_batch=16,
        tag=method, model={"method": method})))
    recorder = _Recorder()
    final = training.train(cfg, sacred_run=recorder)
    stored = load_checkpoint(final)["config"]["model"]
    assert stored["method"] == method and stored["pooling"] == METHOD_DEFAULTS[method]["pooling"]
    assert len(recorder.scalars["loss"]) == 2 and all(math.isfinite(v) for v in recorder.scalars["loss"])
    assert ("align_loss" in recorder.scalars) and (("threshold" in recorder.scalars) == (method == "adnet"))
    summary, out_dir = load_test_script().run_test(dict(cfg, reload_model_path=str(final), save_predictions=False))
    assert 0.0 <= summary["mean"]["model"]["dice"] <= 1.0 and (out_dir / "results.json").is_file()
    predictor = load_predictor(final, device="cpu", amp="off")
    assert type(predictor.model) is MethodSeg and predictor.model.method == method and not predictor.model.training
