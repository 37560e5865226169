"""Losses on predicted class probabilities."""
from __future__ import annotations

from typing import Sequence

import torch

from models.dmap import no_autocast


#: how the focal loss is normalised: "pixels" (by the summed pixel weights, the paper's) or "classes" (each
#: class's mean over its own pixels, then weighted: the balance no longer depends on the foreground's share)
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
    if normalize not in LOSS_NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {LOSS_NORMALIZATIONS}, got {normalize!r}")
    dt = torch.float64 if probs.dtype == torch.float64 else torch.float32
    with no_autocast(probs.device):
        target = target.long()
        p_t = probs.to(dt).gather(1, target.unsqueeze(1)).squeeze(1).clamp(eps, 1.0 - eps)   # [N, H, W]
        weights = torch.as_tensor(class_weights, dtype=dt, device=probs.device)[target]
        per_pixel = -weights * (1.0 - p_t).clamp_min(0.0).pow(gamma) * torch.log(p_t)
        if normalize == "pixels":
            return per_pixel.sum() / weights.sum().clamp_min(torch.finfo(dt).tiny)
        k = probs.shape[1]
        counts = torch.bincount(target.flatten(), minlength=k).to(dt)                          # [K]
        sums = torch.zeros(k, dtype=dt, device=probs.device).index_add_(0, target.flatten(), per_pixel.flatten())
        present = counts > 0
        class_w = torch.as_tensor(class_weights, dtype=dt, device=probs.device)
        return (sums / counts.clamp_min(1.0)).sum() / (class_w * present).sum().clamp_min(torch.finfo(dt).tiny)


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
                 ignore_index: int = 255) -> torch.Tensor:
    """Class-weighted negative log-likelihood, normalised by the summed weights of the counted pixels.

    ``loss = -sum_x w_{y(x)} log p_{y(x)}(x) / sum_x w_{y(x)}`` over the pixels whose label is not
    ``ignore_index`` (``torch.nn.NLLLoss(weight=..., ignore_index=...)``).

    Args:
        log_probs: [N, K, H, W] log class probabilities.
        target: [N, H, W] integer class ids in [0, K) or ``ignore_index``.
        class_weights: K class weights.
        ignore_index: label of pixels left out.

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
        return -(weights * log_p).sum() / weights.sum().clamp_min(torch.finfo(dt).tiny)


def episode_nll(log_probs: torch.Tensor, query_masks: torch.Tensor,
                class_weights: Sequence[float] = (0.1, 1.0)) -> torch.Tensor:
    """:func:`weighted_nll` of each episode, averaged over the episodes of the batch (as :func:`episode_loss`).

    Args:
        log_probs: [B, Q, 2, H, W] log background/foreground probabilities.
        query_masks: [B, Q, H, W] binary ground truth (255: ignored).
        class_weights: (background, foreground).
    """
    losses = [weighted_nll(log_probs[b], query_masks[b], tuple(class_weights)) for b in range(log_probs.shape[0])]
    return torch.stack(losses).mean()
