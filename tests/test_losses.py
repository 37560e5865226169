"""Tests for models/losses.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.losses import focal_loss


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
