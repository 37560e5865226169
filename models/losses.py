"""Losses on predicted class probabilities."""
from __future__ import annotations

from typing import Sequence

import torch

from models.dmap import no_autocast


#: how the query loss (focal or NLL) is normalised: "pixels" (by the summed pixel weights, the papers') or
#: "classes" (each class's mean over its own pixels, then weighted: the balance no longer depends on the
#: foreground's share)
LOSS_NORMALIZATIONS = ("pixels", "classes")


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 0.7,
               class_weights: Sequence[float] = (0.1, 1.0), eps: float = 1e-7,
               normalize: str = "pixels") -> torch.Tensor:
    """Class-weighted focal loss on probabilities, normalised by the summed pixel weights.

    ``loss = -sum_x w_{y(x)} (1 - p_{y(x)}(x))^gamma log p_{y(x)}(x) / sum_x w_{y(x)}``, where ``y(x)``
    is the target class of pixel x, ``p_{y(x)}`` its predicted probability clamped to ``[eps, 1 - eps]``
    (for the log, and so that the gradient of ``(1 - p)^gamma`` stays finite at p = 1), and ``w`` the class weight (background 0.1, foreground 1.0 by default). Computed in
    float32 (float64 for float64 inputs) with autocast disabled.

    With ``normalize="classes"`` each class's per-pixel losses are averaged over that class's pixels first:
    ``loss = sum_k w_k mean_{x: y(x)=k} l(x) / sum_{k present} w_k``. A class covering 0.5 % of the pixels
    then pulls as hard as when it covers 50 %, so a small foreground cannot be outvoted into the
    all-background solution.

    Args:
        probs: [N, K, H, W] class probabilities (K = 2: background, foreground).
        target: [N, H, W] integer class ids in [0, K).
        gamma: focusing parameter.
        class_weights: K class weights.
        eps: probabilities are clamped to [eps, 1 - eps].
        normalize: ``pixels`` or ``classes`` (see above).

    Returns:
        Scalar loss (0 when every pixel has weight 0).
    """
    if probs.dim() != 4 or target.shape != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(f"probs must be [N, K, H, W] and target [N, H, W]; got {tuple(probs.shape)} "
                         f"and {tuple(target.shape)}")
    if len(class_weights) != probs.shape[1]:
        raise ValueError(f"{len(class_weights)} class weights for {probs.shape[1]} classes")
    dt = torch.float64 if probs.dtype == torch.float64 else torch.float32
    with no_autocast(probs.device):
        target = target.long()
        p_t = probs.to(dt).gather(1, target.unsqueeze(1)).squeeze(1).clamp(eps, 1.0 - eps)   # [N, H, W]
        weights = torch.as_tensor(class_weights, dtype=dt, device=probs.device)[target]
        per_pixel = -weights * (1.0 - p_t).clamp_min(0.0).pow(gamma) * torch.log(p_t)
        return _normalised_sum(per_pixel, weights, target, class_weights, normalize)


def _normalised_sum(per_pixel: torch.Tensor, weights: torch.Tensor, target: torch.Tensor,
                    class_weights: Sequence[float], normalize: str) -> torch.Tensor:
    """The weighted per-pixel losses [N, H, W] (0 where a pixel does not count), normalised by the summed
    weights ``weights`` [N, H, W] of the counted pixels (``pixels``) or, per class, by that class's counted
    pixels, then by the summed weights of the classes present (``classes``); ``target`` [N, H, W] holds the
    class ids of the counted pixels (any id in [0, K) where the weight is 0)."""
    if normalize not in LOSS_NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {LOSS_NORMALIZATIONS}, got {normalize!r}")
    dt, tiny = per_pixel.dtype, torch.finfo(per_pixel.dtype).tiny
    if normalize == "pixels":
        return per_pixel.sum() / weights.sum().clamp_min(tiny)
    k = len(class_weights)
    counted = (weights > 0).flatten()
    ids = target.flatten()[counted]
    counts = torch.bincount(ids, minlength=k).to(dt)                                            # [K]
    sums = torch.zeros(k, dtype=dt, device=per_pixel.device).index_add_(0, ids, per_pixel.flatten()[counted])
    class_w = torch.as_tensor(class_weights, dtype=dt, device=per_pixel.device)
    return (sums / counts.clamp_min(1.0)).sum() / (class_w * (counts > 0)).sum().clamp_min(tiny)


def episode_loss(probs: torch.Tensor, query_masks: torch.Tensor, gamma: float = 0.7,
                 class_weights: Sequence[float] = (0.1, 1.0), normalize: str = "pixels") -> torch.Tensor:
    """Focal loss of each episode, averaged over the episodes of the batch.

    Each episode is normalised by its own pixel weights first, so a batch of B episodes trains like B
    single-episode steps averaged.

    Args:
        probs: [B, Q, 2, H, W] background/foreground probabilities.
        query_masks: [B, Q, H, W] binary ground truth.
        gamma, class_weights, normalize: focal-loss parameters (the paper: 0.7, background 0.1 / foreground
            1.0, normalised by pixels).
    """
    losses = [focal_loss(probs[b].float(), query_masks[b], gamma=gamma, class_weights=tuple(class_weights),
                         normalize=normalize)
              for b in range(probs.shape[0])]
    return torch.stack(losses).mean()


def clamped_log(probs: torch.Tensor, eps: float = float(torch.finfo(torch.float32).eps)) -> torch.Tensor:
    """``log(clamp(probs, eps, 1 - eps))`` in float32 (float64 for float64 inputs), autocast disabled.

    The default ``eps`` is float32's machine epsilon, as ADNet's training script clamps.
    """
    dt = torch.float64 if probs.dtype == torch.float64 else torch.float32
    with no_autocast(probs.device):
        return torch.log(probs.to(dt).clamp(eps, 1.0 - eps))


def weighted_nll(log_probs: torch.Tensor, target: torch.Tensor, class_weights: Sequence[float] = (0.1, 1.0),
                 ignore_index: int = 255, normalize: str = "pixels") -> torch.Tensor:
    """Class-weighted negative log-likelihood, normalised by the summed weights of the counted pixels.

    ``loss = -sum_x w_{y(x)} log p_{y(x)}(x) / sum_x w_{y(x)}`` over the pixels whose label is not
    ``ignore_index`` (``torch.nn.NLLLoss(weight=..., ignore_index=...)``). With ``normalize="classes"``,
    as in :func:`focal_loss`: ``sum_k w_k mean_{x: y(x)=k} (-log p_k(x)) / sum_{k present} w_k``.

    Args:
        log_probs: [N, K, H, W] log class probabilities.
        target: [N, H, W] integer class ids in [0, K) or ``ignore_index``.
        class_weights: K class weights.
        ignore_index: label of pixels left out.
        normalize: ``pixels`` or ``classes``.

    Returns:
        Scalar loss (0 when no pixel counts).
    """
    if log_probs.dim() != 4 or target.shape != (log_probs.shape[0], *log_probs.shape[2:]):
        raise ValueError(f"log_probs must be [N, K, H, W] and target [N, H, W]; got {tuple(log_probs.shape)} "
                         f"and {tuple(target.shape)}")
    if len(class_weights) != log_probs.shape[1]:
        raise ValueError(f"{len(class_weights)} class weights for {log_probs.shape[1]} classes")
    dt = torch.float64 if log_probs.dtype == torch.float64 else torch.float32
    with no_autocast(log_probs.device):
        target = target.long()
        counted = target != ignore_index
        safe = torch.where(counted, target, torch.zeros_like(target))
        log_p = log_probs.to(dt).gather(1, safe.unsqueeze(1)).squeeze(1)                     # [N, H, W]
        weights = torch.as_tensor(class_weights, dtype=dt, device=log_probs.device)[safe] * counted.to(dt)
        return _normalised_sum(-(weights * log_p), weights, safe, class_weights, normalize)


def episode_nll(log_probs: torch.Tensor, query_masks: torch.Tensor,
                class_weights: Sequence[float] = (0.1, 1.0), normalize: str = "pixels") -> torch.Tensor:
    """:func:`weighted_nll` of each episode, averaged over the episodes of the batch (as :func:`episode_loss`).

    Args:
        log_probs: [B, Q, 2, H, W] log background/foreground probabilities.
        query_masks: [B, Q, H, W] binary ground truth (255: ignored).
        class_weights: (background, foreground).
        normalize: ``pixels`` or ``classes`` (:func:`weighted_nll`).
    """
    losses = [weighted_nll(log_probs[b], query_masks[b], tuple(class_weights), normalize=normalize)
              for b in range(log_probs.shape[0])]
    return torch.stack(losses).mean()
