"""Tests for models/dmap.py: the efficient prototypes equal the naive full-resolution computation."""
import pytest
import torch
import torch.nn.functional as F

from models.dmap import (LearnableThresholdGeneration, debiased_prototypes, feature_cosine, interpolation_matrix,
                         masked_average_pooling, selection_weights, upsample_adjoint, upsample_maps,
                         upsampled_cosine, upsampled_squared_norm)

D = torch.float64


def _features(b, s, c, h, w, seed=0):
    """Features whose cosines to the mean spread over [~0, 1]: common direction + noise of varying size."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, 1, c, 1, 1, generator=g, dtype=D)
    sigma = torch.linspace(0.05, 3.0, h * w, dtype=D)[torch.randperm(h * w, generator=g)].reshape(1, 1, 1, h, w)
    return base + sigma * torch.randn(b, s, c, h, w, generator=g, dtype=D)


def _masks(b, s, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(b, s, *size, dtype=D)
    for i in range(b):
        for j in range(s):
            y0, x0 = torch.randint(0, size[0] // 2, (2,), generator=g).tolist()
            m[i, j, y0:y0 + size[0] // 2, x0:x0 + size[1] // 2] = 1
    return m


def _naive_up(f, size):
    b, s, c, h, w = f.shape
    return F.interpolate(f.reshape(b * s, c, h, w), size=size, mode="bilinear",
                         align_corners=True).reshape(b, s, c, *size)


def _naive_prototypes(f, m, xi, soft, temperature):
    """Full-resolution reference: upsample, MAP, cosine per pixel, select, average. xi [B, K]."""
    up = _naive_up(f, m.shape[-2:])                                   # [B, S, C, H, W]
    t = (up * m[:, :, None]).sum((1, 3, 4)) / m.sum((1, 2, 3))[:, None]
    cos = F.cosine_similarity(up, t[:, None, :, None, None], dim=2, eps=1e-12)  # [B, S, H, W]
    out = []
    for k in range(xi.shape[1]):
        thr = xi[:, k, None, None, None]
        w = torch.sigmoid((cos - thr) / temperature) * m if soft else (cos >= thr).to(D) * m
        out.append((up * w[:, :, None]).sum((1, 3, 4)) / w.sum((1, 2, 3))[:, None])
    return t, cos, torch.stack(out, 1)


@pytest.mark.parametrize("out_size,in_size", [(64, 16), (23, 5), (7, 7), (9, 1), (1, 4)])
def test_interpolation_matrix_matches_interpolate(out_size, in_size):
    x = torch.randn(1, 1, in_size, 3, dtype=D)
    ref = F.interpolate(x, size=(out_size, 3), mode="bilinear", align_corners=True)[0, 0]
    a = interpolation_matrix(out_size, in_size, x.device, D)
    torch.testing.assert_close(a @ x[0, 0], ref, rtol=0, atol=1e-12)


def test_upsample_maps_and_adjoint():
    g = torch.randn(2, 3, 5, 7, dtype=D)
    up = upsample_maps(g, (19, 23))
    torch.testing.assert_close(up, F.interpolate(g, size=(19, 23), mode="bilinear", align_corners=True))
    m = torch.randn(2, 3, 19, 23, dtype=D)
    torch.testing.assert_close((up * m).sum(), (g * upsample_adjoint(m, (5, 7))).sum())


@pytest.mark.parametrize("size,feat", [((64, 64), (16, 16)), ((37, 29), (6, 9)), ((8, 8), (1, 3))])
def test_upsampled_squared_norm_exact(size, feat):
    f = torch.randn(2, 11, *feat, dtype=D)
    up = F.interpolate(f, size=size, mode="bilinear", align_corners=True)
    torch.testing.assert_close(upsampled_squared_norm(f, size), (up * up).sum(1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("soft", [False, True])
def test_efficient_prototypes_equal_full_resolution(soft):
    b, s, c, h, w, size = 2, 2, 32, 8, 10, (32, 40)
    f, m = _features(b, s, c, h, w), _masks(b, s, size)
    xi = torch.tensor([[0.3, 0.6, 0.8], [0.5, 0.7, 0.2]], dtype=D)
    t_ref, cos_ref, p_ref = _naive_prototypes(f, m, xi, soft, 0.05)
    t = masked_average_pooling(f, m)
    cos = upsampled_cosine(f, t, size)
    p, kept = debiased_prototypes(f, m, cos, xi, soft=soft, temperature=0.05)
    torch.testing.assert_close(t, t_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(cos * m, cos_ref * m, rtol=0, atol=1e-6)
    torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-6)
    assert ((kept > 0.05) & (kept < 0.95)).any()  # the test exercises real selections


def test_n_shot_pools_concatenated_pixels():
    """2-shot prototypes == prototypes over the concatenation of both shots' foreground pixels."""
    f, m = _features(1, 2, 16, 6, 6, seed=3), _masks(1, 2, (24, 24), seed=4)
    up = _naive_up(f, (24, 24))
    pix = torch.cat([up[0, j].permute(1, 2, 0)[m[0, j] > 0] for j in range(2)])   # [N1 + N2, C]
    t_ref = pix.mean(0)
    torch.testing.assert_close(masked_average_pooling(f, m)[0], t_ref, rtol=0, atol=1e-10)
    cos = upsampled_cosine(f, t_ref[None], (24, 24))
    keep = F.cosine_similarity(pix, t_ref[None], dim=1) >= 0.7
    p, _ = debiased_prototypes(f, m, cos, torch.tensor([[0.7]], dtype=D), soft=False)
    torch.testing.assert_close(p[0, 0], pix[keep].mean(0), rtol=0, atol=1e-10)


def test_fixed_threshold_keeps_exactly_cos_ge_09():
    f, m = _features(1, 1, 24, 12, 12, seed=5), _masks(1, 1, (48, 48), seed=6)
    _, cos_ref, _ = _naive_prototypes(f, m, torch.zeros(1, 1, dtype=D), False, 1.0)
    cos = upsampled_cosine(f, masked_average_pooling(f, m), (48, 48))
    weights, kept = selection_weights(cos, m, torch.tensor([[0.9]], dtype=D), soft=False)
    expected = ((cos_ref >= 0.9) & (m > 0)).to(D)
    assert 0 < expected.sum() < m.sum()
    assert torch.equal(weights[:, 0], expected)
    torch.testing.assert_close(kept[0, 0], expected.sum() / m.sum())


def test_empty_selection_falls_back_to_all_foreground():
    f, m = _features(1, 1, 8, 6, 6), _masks(1, 1, (24, 24))
    cos = upsampled_cosine(f, masked_average_pooling(f, m), (24, 24))
    for soft in (False, True):
        weights, kept = selection_weights(cos, m, torch.tensor([[1.5]], dtype=D), soft=soft, temperature=0.01)
        assert torch.equal(weights[:, 0], m) and kept.item() == 1.0


def test_soft_selection_tends_to_hard():
    f, m = _features(1, 1, 16, 8, 8, seed=7), _masks(1, 1, (32, 32), seed=8)
    t = masked_average_pooling(f, m)
    cos = upsampled_cosine(f, t, (32, 32))
    xi = torch.tensor([[0.6]], dtype=D)
    hard, _ = debiased_prototypes(f, m, cos, xi, soft=False)
    errors = [(debiased_prototypes(f, m, cos, xi, soft=True, temperature=tt)[0] - hard).abs().max().item()
              for tt in (0.1, 0.01, 1e-3, 1e-5)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-6


def test_empty_mask_no_nan():
    f = _features(2, 1, 8, 6, 6).requires_grad_(True)
    m = _masks(2, 1, (24, 24))
    m[1] = 0
    t = masked_average_pooling(f, m)
    assert torch.equal(t[1], torch.zeros_like(t[1]))
    cos = upsampled_cosine(f, t, (24, 24))
    p, kept = debiased_prototypes(f, m, cos, torch.tensor([[0.5], [0.5]], dtype=D), soft=True)
    c = feature_cosine(f, p[:, 0])
    assert torch.isfinite(p).all() and torch.isfinite(c).all() and kept[1].item() == 0.0
    (p.sum() + c.sum()).backward()
    assert torch.isfinite(f.grad).all()


def test_ltg_output_and_gradients():
    torch.manual_seed(0)
    ltg = LearnableThresholdGeneration([8, 16], dim=12, xi_init=0.9)
    hs = [torch.randn(3, 8, 10, 10), torch.randn(3, 16, 5, 5)]   # B=1, S=3 support images
    hq = [torch.randn(2, 8, 10, 10), torch.randn(2, 16, 5, 5)]   # B=1, Q=2 queries
    sp = ltg.support_part(hs, (10, 10)).reshape(1, 3, 12, 10, 10)
    qp = ltg.query_part(hq, (10, 10)).reshape(1, 2, 12, 10, 10)
    xi = ltg(sp, torch.rand(1, 3, 10, 10), qp)
    assert xi.shape == (1, 2) and ((xi > 0) & (xi < 1)).all()
    assert (xi - 0.9).abs().max() < 0.05
    xi.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ltg.parameters())
    with pytest.raises(ValueError):
        LearnableThresholdGeneration([8], xi_init=1.0)


def test_masked_average_pooling_hand_computed():
    # channel 0 = [[0, 2], [4, 6]] upsampled (bilinear, align_corners=True) to 3 x 3 is
    # [[0, 1, 2], [2, 3, 4], [4, 5, 6]]; the top-left 2 x 2 of the mask covers 0, 1, 2, 3 -> mean 1.5.
    # channel 1 is constant 5, so its average is 5 whatever the mask.
    features = torch.tensor([[[0.0, 2.0], [4.0, 6.0]], [[5.0, 5.0], [5.0, 5.0]]], dtype=torch.float64)
    mask = torch.zeros(3, 3, dtype=torch.float64)
    mask[:2, :2] = 1
    prototype = masked_average_pooling(features[None, None], mask[None, None])
    torch.testing.assert_close(prototype, torch.tensor([[1.5, 5.0]], dtype=torch.float64))
    # two shots pool their pixels: the second shot's single pixel (2, 2) has value 6
    mask2 = torch.zeros(3, 3, dtype=torch.float64)
    mask2[2, 2] = 1
    pooled = masked_average_pooling(torch.stack([features, features])[None], torch.stack([mask, mask2])[None])
    torch.testing.assert_close(pooled, torch.tensor([[(0 + 1 + 2 + 3 + 6) / 5, 5.0]], dtype=torch.float64))
