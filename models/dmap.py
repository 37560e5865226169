"""Masked average pooling, de-biased prototypes (DMAP) and Learnable Threshold Generation (LTG).

Notation (shapes): ``B`` episodes, ``S`` support shots, ``K`` selection sets (one per query, or 1 when
the threshold does not depend on the query), ``C`` feature channels, ``h x w`` feature resolution,
``H x W`` mask / image resolution.

The mathematics is that of the paper (and the public code): support features are bilinearly upsampled
(``align_corners=True``) to the mask size, the prototype T is the average of the upsampled features over
the foreground pixels, ``s_i = cos(f_i, T)`` for every foreground pixel ``i``, and the de-biased prototype
is the average of the foreground features with ``s_i >= xi`` (all of them when none pass).

Efficient evaluation, same numbers. Bilinear upsampling is linear and separable: ``U f_c = A_h f_c A_w^T``
with 1-D interpolation matrices ``A_h [H, h]``, ``A_w [W, w]``. Hence

* a weighted sum of upsampled features ``sum_x m(x) (U f_c)(x) = <f_c, A_h^T m A_w>``: the (full-size)
  weight map is pulled back to feature resolution by the adjoint of the upsampling
  (:func:`upsample_adjoint`) and contracted with the features there;
* the cosine numerator ``<(U f)(x), T> = U(<f, T>)(x)``: one upsampled scalar map;
* the squared norm ``||(U f)(x)||^2 = sum_{p,q} w_p w_q <f_p, f_q>`` over the four bilinear corners
  ``p, q`` of pixel ``x``: a quadratic form that needs only the inner products of neighbouring feature
  vectors (five scalar maps at feature resolution, :func:`upsampled_squared_norm`).

No ``[C, H, W]`` tensor is ever built: only scalar ``[H, W]`` maps. ``tests/test_dmap.py`` checks the
result against the naive full-resolution computation in float64.

Empty support masks: the prototype is the zero vector (sum over no pixels divided by ``max(count, 1)``);
all cosines with it are 0 (norms are clamped at ``eps``), so the prediction becomes ``sigmoid(tau / 2)``
everywhere -- finite, no NaN in values or gradients.

All functions here compute in float32 (float64 if given float64) with autocast disabled.
"""
from __future__ import annotations

import contextlib
import math
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

#: learned: LTG threshold, soft selection in training; learned_st: LTG threshold, hard selection in the
#: forward pass of training too (the gradient reaches xi through the soft rule: straight-through);
#: fixed: cosine >= fixed_threshold; off: plain masked average pooling
DMAP_MODES = ("learned", "learned_st", "fixed", "off")
#: the modes whose threshold comes from the LTG head
LTG_MODES = ("learned", "learned_st")
EPS = 1e-8


def no_autocast(device: torch.device):
    """Context manager that disables torch.autocast for ``device``'s type (no-op if unsupported)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # device type without autocast support
        return contextlib.nullcontext()


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (bf16/fp16 features are promoted)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def interpolation_matrix(out_size: int, in_size: int, device: torch.device,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """1-D bilinear interpolation matrix of ``F.interpolate(..., align_corners=True)``.

    Args:
        out_size: output length (e.g. H).
        in_size: input length (e.g. h).

    Returns:
        A [out_size, in_size] with ``upsampled = A @ signal``; each row has at most two non-zeros.
    """
    index, frac = _corners(out_size, in_size, device, dtype)
    matrix = torch.zeros(out_size, in_size + 1, device=device, dtype=dtype)
    rows = torch.arange(out_size, device=device)
    matrix[rows, index] += 1 - frac
    matrix[rows, index + 1] += frac
    return matrix[:, :in_size]  # column in_size only ever gets weight 0 (frac == 0 at the last sample)


def _corners(out_size: int, in_size: int, device: torch.device,
             dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lower corner index [out] (long, <= in_size-1) and fraction [out] of align_corners=True sampling."""
    if out_size > 1 and in_size > 1:
        src = torch.arange(out_size, device=device, dtype=torch.float64) * ((in_size - 1) / (out_size - 1))
    else:
        src = torch.zeros(out_size, device=device, dtype=torch.float64)
    index = src.floor().clamp_(0, in_size - 1)
    frac = (src - index).clamp_(0, 1)
    return index.long(), frac.to(dtype)


def upsample_maps(maps: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=True) upsampling of scalar maps via the separable matrices.

    Args:
        maps: [..., h, w].
        size: (H, W).

    Returns:
        [..., H, W], equal to ``F.interpolate(maps, size, mode="bilinear", align_corners=True)``.
    """
    a_h = interpolation_matrix(size[0], maps.shape[-2], maps.device, maps.dtype)
    a_w = interpolation_matrix(size[1], maps.shape[-1], maps.device, maps.dtype)
    return a_h @ maps @ a_w.transpose(0, 1)


def upsample_adjoint(maps: torch.Tensor, feature_size: Tuple[int, int]) -> torch.Tensor:
    """Adjoint of :func:`upsample_maps`: pulls full-size weight maps back to feature resolution.

    ``sum_x m(x) (U f)(x) == sum_y (U^T m)(y) f(y)`` for every feature map ``f``.

    Args:
        maps: [..., H, W].
        feature_size: (h, w).

    Returns:
        [..., h, w] = ``A_h^T maps A_w``.
    """
    a_h = interpolation_matrix(maps.shape[-2], feature_size[0], maps.device, maps.dtype)
    a_w = interpolation_matrix(maps.shape[-1], feature_size[1], maps.device, maps.dtype)
    return a_h.transpose(0, 1) @ maps @ a_w


def upsampled_squared_norm(features: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Exact per-pixel squared norm of the bilinearly upsampled features, without upsampling them.

    For output pixel x with corners p in {00, 01, 10, 11} and bilinear weights w_p,
    ``||(U f)(x)||^2 = sum_p sum_q w_p w_q <f_p, f_q>``; the ten distinct products come from five
    inner-product maps of neighbouring feature vectors computed at feature resolution.

    Args:
        features: [N, C, h, w].
        size: (H, W).

    Returns:
        [N, H, W].
    """
    n, _, h, w = features.shape
    dev, dt = features.device, features.dtype
    fp = F.pad(features, (0, 1, 0, 1))  # [N, C, h+1, w+1]; padded entries only ever get weight 0
    norm = (fp * fp).sum(1)                                  # <f(i,j), f(i,j)>       [N, h+1, w+1]
    horiz = (fp[:, :, :, :-1] * fp[:, :, :, 1:]).sum(1)      # <f(i,j), f(i,j+1)>     [N, h+1, w]
    vert = (fp[:, :, :-1, :] * fp[:, :, 1:, :]).sum(1)       # <f(i,j), f(i+1,j)>     [N, h, w+1]
    diag = (fp[:, :, :-1, :-1] * fp[:, :, 1:, 1:]).sum(1)    # <f(i,j), f(i+1,j+1)>   [N, h, w]
    anti = (fp[:, :, :-1, 1:] * fp[:, :, 1:, :-1]).sum(1)    # <f(i,j+1), f(i+1,j)>   [N, h, w]
    ri, a = _corners(size[0], h, dev, dt)
    ci, b = _corners(size[1], w, dev, dt)
    r0, r1, c0, c1 = ri[:, None], ri[:, None] + 1, ci[None, :], ci[None, :] + 1
    a, b = a[:, None], b[None, :]
    w00, w01, w10, w11 = (1 - a) * (1 - b), (1 - a) * b, a * (1 - b), a * b
    out = (w00 * w00 * norm[:, r0, c0] + w01 * w01 * norm[:, r0, c1]
           + w10 * w10 * norm[:, r1, c0] + w11 * w11 * norm[:, r1, c1])
    out = out + 2 * (w00 * w01 * horiz[:, r0, c0] + w10 * w11 * horiz[:, r1, c0]
                     + w00 * w10 * vert[:, r0, c0] + w01 * w11 * vert[:, r0, c1]
                     + w00 * w11 * diag[:, r0, c0] + w01 * w10 * anti[:, r0, c0])
    return out.clamp_min(0)


def _safe_norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Euclidean norm clamped at EPS, with a finite gradient at 0."""
    return (x * x).sum(dim).clamp_min(EPS * EPS).sqrt()


def masked_average_pooling(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Masked average pooling (MAP) of bilinearly upsampled features over all shots' mask pixels.

    Args:
        features: [B, S, C, h, w] support features.
        masks: [B, S, H, W] binary foreground masks.

    Returns:
        Prototypes T [B, C] (zero vector for an all-empty mask), dtype float32/float64.
    """
    dt = compute_dtype(features)
    with no_autocast(features.device):
        f, m = features.to(dt), masks.to(dt)
        sums, totals = weighted_feature_sums(f, m.unsqueeze(1))
        return sums[:, 0] / totals[:, 0, None].clamp_min(1.0)


def weighted_feature_sums(features: torch.Tensor, weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sums of upsampled features weighted by full-size pixel weights, computed at feature resolution.

    Args:
        features: [B, S, C, h, w].
        weights: [B, K, S, H, W] pixel weights (K weight sets per episode).

    Returns:
        (sums [B, K, C], totals [B, K]) with ``sums = sum_{s,x} weights(x) (U f_s)(x)`` and
        ``totals = sum_{s,x} weights(x)``.
    """
    pulled = upsample_adjoint(weights, features.shape[-2:])           # [B, K, S, h, w]
    sums = torch.einsum("bkshw,bschw->bkc", pulled, features)
    return sums, weights.sum(dim=(-3, -2, -1))


def upsampled_cosine(features: torch.Tensor, prototype: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Cosine between every upsampled support feature vector and the prototype, exactly.

    Args:
        features: [B, S, C, h, w].
        prototype: [B, C].
        size: (H, W).

    Returns:
        [B, S, H, W] cosines (0 where either vector is zero).
    """
    b, s, c, h, w = features.shape
    numerator = upsample_maps(torch.einsum("bschw,bc->bshw", features, prototype), size)
    sq_norm = upsampled_squared_norm(features.reshape(b * s, c, h, w), size).reshape(b, s, *size)
    f_norm = sq_norm.clamp_min(EPS * EPS).sqrt()
    p_norm = _safe_norm(prototype, 1)[:, None, None, None]
    return numerator / (f_norm * p_norm)


def feature_cosine(features: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    """Cosine between feature vectors and per-set prototypes at feature resolution.

    Args:
        features: [B, N, C, h, w].
        prototype: [B, C] (shared) or [B, N, C] (one per image).

    Returns:
        [B, N, h, w].
    """
    if prototype.dim() == 2:
        prototype = prototype[:, None].expand(-1, features.shape[1], -1)
    numerator = torch.einsum("bnchw,bnc->bnhw", features, prototype)
    return numerator / (_safe_norm(features, 2) * _safe_norm(prototype, 2)[..., None, None])


def selection_weights(cosine: torch.Tensor, fg: torch.Tensor, xi: torch.Tensor, soft: bool,
                      temperature: float = 0.05, straight_through: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """De-biasing selection of foreground support pixels.

    Hard rule: keep pixel i iff ``s_i >= xi``. Soft rule (training in ``learned`` mode):
    ``weight_i = sigmoid((s_i - xi) / temperature)``; it tends to the hard rule as temperature -> 0
    (for s_i != xi). Straight-through (``learned_st``): the values are the hard rule's, the gradient is the
    soft rule's (``hard + soft - soft.detach()``), so training sees the selection evaluation uses. A
    selection whose total weight is < 1e-4 pixel (nothing passes) falls back to all foreground pixels
    (weight 1 each).

    Args:
        cosine: [B, S, H, W] cosines s_i.
        fg: [B, S, H, W] binary foreground masks (float).
        xi: [B, K] thresholds (K selection sets, e.g. one per query).
        soft: soft (differentiable in xi) or hard selection.
        temperature: soft-selection temperature.
        straight_through: hard values with the soft rule's gradient (overrides ``soft``).

    Returns:
        (weights [B, K, S, H, W], kept_fraction [B, K] = total weight / number of foreground pixels,
        0 for an empty mask).
    """
    s = cosine[:, None]                      # [B, 1, S, H, W]
    thr = xi[:, :, None, None, None]         # [B, K, 1, 1, 1]
    fgk = fg[:, None]
    if straight_through:
        relaxed = torch.sigmoid((s - thr) / temperature)
        weights = ((s >= thr).to(relaxed.dtype) + relaxed - relaxed.detach()) * fgk
    elif soft:
        weights = torch.sigmoid((s - thr) / temperature) * fgk
    else:
        weights = (s >= thr).to(fg.dtype) * fgk
    totals = weights.sum(dim=(-3, -2, -1))   # [B, K]
    fallback = (totals < 1e-4)[:, :, None, None, None]
    weights = torch.where(fallback, fgk.expand_as(weights), weights)
    n_fg = fg.sum(dim=(-3, -2, -1))[:, None]
    kept = weights.sum(dim=(-3, -2, -1)) / n_fg.clamp_min(1.0)
    return weights, kept


def debiased_prototypes(features: torch.Tensor, fg: torch.Tensor, cosine: torch.Tensor, xi: torch.Tensor,
                        soft: bool, temperature: float = 0.05,
                        straight_through: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """De-biased prototypes: weighted mean of the selected upsampled foreground support features.

    Args:
        features: [B, S, C, h, w] support features (float32/float64).
        fg: [B, S, H, W] binary masks.
        cosine: [B, S, H, W] ``cos(f_i, T)`` (:func:`upsampled_cosine`).
        xi: [B, K] thresholds.
        soft: soft selection (training, ``learned``) or hard rule.
        temperature: soft-selection temperature.
        straight_through: hard selection values with the soft rule's gradient (training, ``learned_st``).

    Returns:
        (prototypes [B, K, C], kept_fraction [B, K]).
    """
    with no_autocast(features.device):
        weights, kept = selection_weights(cosine, fg, xi, soft, temperature, straight_through)
        sums, totals = weighted_feature_sums(features, weights)
        return sums / totals[..., None].clamp_min(1e-4), kept


class LearnableThresholdGeneration(nn.Module):
    """LTG: predicts the de-biasing threshold xi in (0, 1) from support and query hidden features.

    As the paper describes: the hidden features of support and query from several ResNet stages are
    concatenated level by level, convolved (1x1) and summed into F_hidden; the cosine map between the
    support features and the MAP prototype T gates F_hidden; a small convolutional encoder maps the gated
    map to xi. A 1x1 convolution of the concatenation ``[f_s^l; f_q^l]`` equals
    ``W_s^l f_s^l + W_q^l f_q^l + b^l``, which is how it is computed (so the support half can be cached
    and reused for many queries). With several shots the gated maps are averaged over the shots.

    Args:
        hidden_channels: channels of the hidden stages (e.g. [256, 512, 1024]).
        dim: channels of F_hidden.
        xi_init: initial threshold (bias of the output layer = logit(xi_init)).
    """

    def __init__(self, hidden_channels: Sequence[int], dim: int = 64, xi_init: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < xi_init < 1.0:
            raise ValueError(f"xi_init must be in (0, 1), got {xi_init}")
        self.support_proj = nn.ModuleList(nn.Conv2d(c, dim, 1, bias=False) for c in hidden_channels)
        self.query_proj = nn.ModuleList(nn.Conv2d(c, dim, 1, bias=True) for c in hidden_channels)
        self.encoder = nn.Sequential(
            nn.Conv2d(dim, dim, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
        )
        self.head = nn.Linear(dim, 1)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.constant_(self.head.bias, math.log(xi_init / (1 - xi_init)))

    @staticmethod
    def _project(projections: nn.ModuleList, hidden: List[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        out = None
        for proj, feat in zip(projections, hidden):
            y = proj(feat)
            if tuple(y.shape[-2:]) != tuple(size):
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=True)
            out = y if out is None else out + y
        return out

    def support_part(self, hidden: List[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        """Support half of the level-wise convolutions, summed over levels.

        Args:
            hidden: per level [N, C_l, h_l, w_l] (N support images).
            size: (h, w) feature resolution of F_hidden.

        Returns:
            [N, dim, h, w].
        """
        return self._project(self.support_proj, hidden, size)

    def query_part(self, hidden: List[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        """Query half (with the biases), summed over levels: [N, C_l, h_l, w_l] per level -> [N, dim, h, w]."""
        return self._project(self.query_proj, hidden, size)

    def forward(self, support: torch.Tensor, gate: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Thresholds for every (episode, query).

        Args:
            support: [B, S, dim, h, w] from :meth:`support_part`.
            gate: [B, S, h, w] cosine map between support features and T.
            query: [B, Q, dim, h, w] from :meth:`query_part`.

        Returns:
            xi [B, Q] in (0, 1), float32.
        """
        b, s, d, h, w = support.shape
        q = query.shape[1]
        hidden = F.relu(support[:, :, None] + query[:, None])              # [B, S, Q, d, h, w]
        gated = (hidden * gate[:, :, None, None].to(hidden.dtype)).mean(1)  # [B, Q, d, h, w]
        code = self.encoder(gated.reshape(b * q, d, h, w))
        with no_autocast(code.device):
            xi = torch.sigmoid(self.head(code.float()))
        return xi.reshape(b, q)
