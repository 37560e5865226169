"""Tests for models/fewshot.py: shapes, batching, support reuse, gradients, empty masks, autocast."""
import pytest
import torch
import torch.nn.functional as F

from models.fewshot import FewShotSeg
from models.losses import focal_loss

pytestmark = pytest.mark.filterwarnings("ignore:Encoder.*randomly initialised:UserWarning")

SIZE = 64


def _model(mode="learned", backbone="resnet18", seed=0, **kw):
    torch.manual_seed(seed)
    return FewShotSeg(backbone=backbone, dmap_mode=mode, **kw)


def _episode(b=None, s=1, q=1, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = () if b is None else (b,)
    si = torch.randn(*lead, s, 3, size, size, generator=g)
    qi = torch.randn(*lead, q, 3, size, size, generator=g)
    sm = torch.zeros(*lead, s, size, size)
    sm[..., size // 4: size // 2 + 4, size // 5: size // 2] = 1
    return si, sm, qi


@pytest.mark.parametrize("mode", ["learned", "fixed", "off"])
def test_shapes_and_probabilities(mode):
    model = _model(mode)
    si, sm, qi = _episode(s=2, q=3)
    probs, aux = model(si, sm, qi)
    assert probs.shape == (3, 2, SIZE, SIZE) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(3, SIZE, SIZE))
    assert aux["tau"].shape == (3,) and aux["xi"].shape == (3,) and aux["kept_fraction"].dim() == 0
    assert 0 < aux["kept_fraction"].item() <= 1


def test_resnet101_256_shapes():
    model = _model("learned", backbone="resnet101").eval()
    si, sm, qi = _episode(size=256)
    captured = {}
    model.encoder.register_forward_hook(lambda mod, args, out: captured.update(out))
    with torch.no_grad():
        probs, aux = model(si, sm, qi)   # one resnet101 forward of support + query at 256 x 256
    enc = captured
    assert enc["features"].shape == (2, 512, 64, 64)
    assert [tuple(h.shape[1:]) for h in enc["hidden"]] == [(256, 64, 64), (512, 64, 64), (1024, 64, 64)]
    assert probs.shape == (1, 2, 256, 256) and torch.isfinite(probs).all()


@pytest.mark.parametrize("mode", ["learned", "fixed", "off"])
def test_gradients_reach_ltg_only_in_learned_mode(mode):
    model = _model(mode).train()
    si, sm, qi = _episode()
    probs, _ = model(si, sm, qi)
    focal_loss(probs, (torch.rand(1, SIZE, SIZE) > 0.5).long()).backward()
    ltg_grads = {n: p.grad for n, p in model.ltg.named_parameters()}
    if mode == "learned":
        missing = [n for n, g in ltg_grads.items() if g is None or not torch.any(g != 0)]
        assert not missing, f"LTG parameters without gradient: {missing}"
    else:
        assert all(g is None for g in ltg_grads.values())
        assert not any(p.requires_grad for p in model.ltg.parameters())  # frozen: nothing unused for DDP
        model.dmap_mode = "learned"
        assert all(p.requires_grad for p in model.ltg.parameters())
    assert model.encoder.reduce.weight.grad is not None and model.encoder.tau_head.weight.grad is not None


@pytest.mark.parametrize("mode", ["learned", "fixed", "off"])
def test_empty_support_mask_no_nan(mode):
    model = _model(mode).train()
    si, sm, qi = _episode()
    sm.zero_()
    probs, aux = model(si, sm, qi)
    focal_loss(probs, torch.zeros(1, SIZE, SIZE, dtype=torch.long)).backward()
    assert torch.isfinite(probs).all() and aux["kept_fraction"].item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # zero prototype -> cos = 0 -> p_fg = sigmoid(tau / 2) everywhere
    torch.testing.assert_close(probs[0, 1], torch.sigmoid(aux["tau"][0] / 2).expand(SIZE, SIZE))


@pytest.mark.parametrize("mode", ["learned", "fixed"])
def test_batched_equals_per_episode(mode):
    model = _model(mode).eval()
    si, sm, qi = _episode(b=2, s=2, q=2)
    sm[1, 1].zero_()
    sm[1, 0, 5:20, 30:60] = 1
    with torch.no_grad():
        probs, aux = model(si, sm, qi)
        assert probs.shape == (2, 2, 2, SIZE, SIZE) and aux["xi"].shape == (2, 2)
        for i in range(2):
            p_i, a_i = model(si[i], sm[i], qi[i])
            torch.testing.assert_close(probs[i], p_i, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(aux["xi"][i], a_i["xi"], rtol=1e-4, atol=1e-5)
        p1, _ = model(si[:1], sm[:1], qi[:1])
        p0, _ = model(si[0], sm[0], qi[0])
    torch.testing.assert_close(p1[0], p0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["learned", "fixed", "off"])
def test_encode_support_then_segment_equals_forward(mode):
    model = _model(mode).eval()
    si, sm, qi = _episode(s=1, q=3)
    with torch.no_grad():
        ref, ref_aux = model(si, sm, qi)
        enc = model.encode_support(si, sm)
        probs, aux = model.segment(enc, qi)                 # a chunk of query slices as a batch
        single, _ = model.segment(enc, qi[1:2])
    torch.testing.assert_close(probs, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(aux["xi"], ref_aux["xi"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(single[0], ref[1], rtol=1e-4, atol=1e-5)


def test_segment_batched_encoding():
    model = _model("learned").eval()
    si, sm, qi = _episode(b=2, q=2)
    with torch.no_grad():
        ref, _ = model(si, sm, qi)
        probs, _ = model.segment(model.encode_support(si, sm), qi)
    torch.testing.assert_close(probs, ref, rtol=1e-4, atol=1e-5)


def test_two_shot_prototype_pools_all_foreground_pixels():
    model = _model("off").eval()
    si, sm, qi = _episode(s=2)
    sm[1].zero_()
    sm[1, 40:60, 10:30] = 1
    with torch.no_grad():
        enc = model.encode_support(si, sm)
        feats = model.encoder(si)["features"]
    up = F.interpolate(feats, size=(SIZE, SIZE), mode="bilinear", align_corners=True)
    pix = torch.cat([up[j].permute(1, 2, 0)[sm[j] > 0] for j in range(2)])
    torch.testing.assert_close(enc.prototype[0], pix.mean(0), rtol=1e-4, atol=1e-5)


def test_hard_rule_in_eval_soft_in_training():
    model = _model("learned", temperature=0.05)
    si, sm, qi = _episode()
    model.train()
    _, aux_train = model(si, sm, qi)
    model.eval()
    with torch.no_grad():
        _, aux_eval = model(si, sm, qi)
    # hard rule: the kept fraction is a count of pixels, a multiple of 1 / n_fg
    n_fg = sm.sum().item()
    assert abs(aux_eval["kept_fraction"].item() * n_fg - round(aux_eval["kept_fraction"].item() * n_fg)) < 1e-3
    assert aux_train["kept_fraction"].item() != aux_eval["kept_fraction"].item()


def test_autocast_bf16_cpu():
    model = _model("learned").train()
    si, sm, qi = _episode()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs, aux = model(si, sm, qi)
        loss = focal_loss(probs, (torch.rand(1, SIZE, SIZE) > 0.5).long())
    loss.backward()
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all() and torch.isfinite(loss)
    assert aux["xi"].dtype == torch.float32 and torch.isfinite(aux["xi"]).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_channels_last():
    model = _model("learned").eval()
    si, sm, qi = _episode(q=2)
    with torch.no_grad():
        ref, _ = model(si, sm, qi)
        model = model.to(memory_format=torch.channels_last)
        out, _ = model(si.contiguous(memory_format=torch.channels_last), sm,
                       qi.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="dmap_mode"):
        FewShotSeg(backbone="resnet18", dmap_mode="sometimes")
    model = _model("off")
    si, sm, qi = _episode()
    with pytest.raises(ValueError, match="support_masks"):
        model(si, sm[:, :10], qi)
    with pytest.raises(ValueError):
        model(si, sm, qi[None])
