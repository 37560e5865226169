"""Tests for models/losses.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.losses import clamped_log, episode_nll, focal_loss, weighted_nll


def test_hand_computed():
    p_fg = torch.tensor([0.8, 0.3, 0.6, 0.1]).reshape(1, 1, 2, 2)
    probs = torch.cat([1 - p_fg, p_fg], 1)
    target = torch.tensor([[1, 0], [0, 1]]).reshape(1, 2, 2)
    # pixel terms: w * (1 - p_t)^0.7 * -log(p_t)
    terms = [1.0 * 0.2 ** 0.7 * -math.log(0.8), 0.1 * 0.3 ** 0.7 * -math.log(0.7),
             0.1 * 0.6 ** 0.7 * -math.log(0.4), 1.0 * 0.9 ** 0.7 * -math.log(0.1)]
    expected = sum(terms) / (1.0 + 0.1 + 0.1 + 1.0)
    assert focal_loss(probs, target).item() == pytest.approx(expected, rel=1e-6)


def test_gamma0_unit_weights_is_nll():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 2, 5, 6), 1)
    target = torch.randint(0, 2, (2, 5, 6))
    ref = F.nll_loss(torch.log(probs), target)
    torch.testing.assert_close(focal_loss(probs, target, gamma=0.0, class_weights=(1.0, 1.0)), ref)


def test_saturated_probabilities_finite():
    p_fg = torch.tensor([1.0, 0.0, 1.0, 0.0]).reshape(1, 1, 2, 2).requires_grad_(True)
    probs = torch.cat([1 - p_fg, p_fg], 1)
    target = torch.tensor([[1, 1], [0, 0]]).reshape(1, 2, 2)
    loss = focal_loss(probs, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p_fg.grad).all()
    assert loss.item() > 1.0  # the confidently wrong pixels are penalised through the clamp


def test_bf16_input_computed_in_float32():
    probs = torch.softmax(torch.randn(1, 2, 4, 4), 1)
    target = torch.randint(0, 2, (1, 4, 4))
    out = focal_loss(probs.bfloat16(), target)
    assert out.dtype == torch.float32


def test_shape_errors():
    with pytest.raises(ValueError):
        focal_loss(torch.rand(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError):
        focal_loss(torch.rand(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), class_weights=(1.0,))


def test_weighted_nll_hand_computed_with_an_ignored_pixel():
    p_fg = torch.tensor([0.8, 0.3, 0.6, 0.1]).reshape(1, 1, 2, 2)
    log_probs = torch.log(torch.cat([1 - p_fg, p_fg], 1))
    target = torch.tensor([[1, 0], [0, 255]]).reshape(1, 2, 2)
    expected = -(1.0 * math.log(0.8) + 0.1 * math.log(0.7) + 0.1 * math.log(0.4)) / (1.0 + 0.1 + 0.1)
    assert weighted_nll(log_probs, target, (0.1, 1.0)).item() == pytest.approx(expected, rel=1e-6)
    ref = F.nll_loss(log_probs, target, weight=torch.tensor([0.1, 1.0]), ignore_index=255)
    torch.testing.assert_close(weighted_nll(log_probs, target, (0.1, 1.0)), ref)


def test_weighted_nll_normalised_by_classes_hand_computed_with_an_ignored_pixel():
    p_fg = torch.tensor([0.8, 0.3, 0.6, 0.1]).reshape(1, 1, 2, 2)
    log_probs = torch.log(torch.cat([1 - p_fg, p_fg], 1))
    target = torch.tensor([[1, 0], [0, 255]]).reshape(1, 2, 2)
    # each class's mean over its own counted pixels, weighted, over the weights of the classes present
    expected = (1.0 * -math.log(0.8) + 0.5 * -(math.log(0.7) + math.log(0.4)) / 2) / (1.0 + 0.5)
    got = weighted_nll(log_probs, target, (0.5, 1.0), normalize="classes")
    assert got.item() == pytest.approx(expected, rel=1e-6)
    only_bg = torch.tensor([[0, 0], [0, 255]]).reshape(1, 2, 2)  # no foreground: its weight leaves the sum
    expected_bg = -(math.log(0.2) + math.log(0.7) + math.log(0.4)) / 3
    assert weighted_nll(log_probs, only_bg, (0.5, 1.0), normalize="classes").item() == \
        pytest.approx(expected_bg, rel=1e-6)
    batch = torch.cat([log_probs, log_probs]).unsqueeze(1), torch.stack([target, only_bg]).reshape(2, 1, 2, 2)
    assert episode_nll(*batch, (0.5, 1.0), normalize="classes").item() == \
        pytest.approx((expected + expected_bg) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="normalize"):
        weighted_nll(log_probs, target, (0.5, 1.0), normalize="voxels")


def test_episode_nll_is_the_mean_of_per_episode_losses():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 1, 2, 4, 5), 2)
    target = torch.randint(0, 2, (2, 1, 4, 5))
    per = [weighted_nll(torch.log(probs[b]), target[b], (0.1, 1.0)) for b in range(2)]
    torch.testing.assert_close(episode_nll(torch.log(probs), target, (0.1, 1.0)), (per[0] + per[1]) / 2)


def test_clamped_log_uses_float32_epsilon():
    eps = torch.finfo(torch.float32).eps
    out = clamped_log(torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(out, torch.log(torch.tensor([eps, 0.5, 1 - eps])))
    assert torch.isfinite(out).all()
