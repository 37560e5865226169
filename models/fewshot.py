"""FewShotSeg: the DMAP few-shot segmentation model (encoder + de-biased prototype + ADNet-style head).

:meth:`FewShotSeg.from_config` builds this class for DMAP's own components and
:class:`models.methods.MethodSeg` (a subclass) for other methods and ablations (``model.method``,
:mod:`models.components`); both are trained through :meth:`FewShotSeg.training_loss`.

Prediction (ADNet style, as the public code): ``p_fg = sigmoid(alpha * cos(F_q, P) + tau / 2)`` at
feature resolution (H/4 x W/4), upsampled bilinearly (``align_corners=True``) to the input size;
``probs = [1 - p_fg, p_fg]``. ``P`` is the de-biased prototype of :mod:`models.dmap`; ``tau`` comes from
the query's layer4 (:class:`models.encoder.Encoder`).

Inputs are either one episode (4-D images) or a batch of episodes (5-D images); every image of the call
(all supports and queries of all episodes) passes the encoder in one batch. n-shot (S > 1) pools the
foreground pixels of all shots together.

Batch normalisation: in ``train()`` mode the BatchNorm statistics are those of the whole encoder batch,
so a batched forward equals per-episode forwards only in ``eval()`` mode (or with frozen BatchNorm).
layer4 feeds only the tau head; with ``bn_with_support`` (the default, as the public code) it runs on
supports and queries together in training, so its batch statistics include the support; otherwise it runs
on the queries only. In ``eval()`` mode the two agree and the supports' layer4 is skipped.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.components import Components, resolve_components
from models.dmap import (DMAP_MODES, LTG_MODES, LearnableThresholdGeneration, compute_dtype, debiased_prototypes,
                         feature_cosine, masked_average_pooling, no_autocast, upsampled_cosine)
from models.encoder import Encoder
from models.losses import episode_loss
from util.checkpoints import load_model_weights


def trainable_parameter_count(module: nn.Module) -> int:
    """Number of parameter values training updates: those with ``requires_grad`` (frozen parts left out)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@dataclass
class SupportEncoding:
    """The support side of an episode batch, computed once and reused for many query slices.

    Attributes:
        features: [B, S, C, h, w] support features (float32, float64 for float64 inputs).
        fg: [B, S, H, W] binary foreground masks (same dtype).
        prototype: [B, C] masked-average prototype T.
        cosine: [B, S, H, W] ``cos((U f)(x), T)`` at full resolution, or None in ``off`` mode.
        ltg_support: [B, S, dim, h, w] support half of LTG's level-wise convolutions (``learned`` only).
        gate: [B, S, h, w] cosine between support features and T at feature resolution (``learned`` only).
        batched: whether the inputs were 5-D (results keep the episode dimension).
        image_size: (H, W).
    """

    features: torch.Tensor
    fg: torch.Tensor
    prototype: torch.Tensor
    cosine: Optional[torch.Tensor]
    ltg_support: Optional[torch.Tensor]
    gate: Optional[torch.Tensor]
    batched: bool
    image_size: Tuple[int, int]


class FewShotSeg(nn.Module):
    """DMAP few-shot segmentation model.

    Args:
        backbone: ``resnet101`` (default), ``resnet50``, ``resnet34`` or ``resnet18``.
        weights_path: local backbone checkpoint (DeepLabv3 COCO or ImageNet layout) or None/"" (random).
        dmap_mode: ``learned`` (LTG threshold; soft selection while training, hard rule in eval),
            ``learned_st`` (LTG threshold; hard selection in training too, straight-through gradient),
            ``fixed`` (keep cosine >= ``fixed_threshold``, the public code) or ``off`` (plain MAP).
        temperature: soft-selection temperature of ``learned`` mode.
        fixed_threshold: threshold of ``fixed`` mode.
        alpha: cosine scale of the prediction (ADNet: 10, i.e. the public code's 20 * 0.5).
        ltg_dim: channels of LTG's F_hidden.
        xi_init: LTG's initial threshold.
        out_dim: feature channels after the 1x1 reduction.
        min_loaded_fraction: share of the backbone's tensors ``weights_path`` must provide (see
            :func:`models.encoder.load_backbone_weights`).
        bn_with_support: in training, run layer4 (the tau head's input) on supports and queries in one
            batch (the public code) instead of the queries only.
    """

    #: the method this class implements (:mod:`models.components`)
    method = "dmap"

    def __init__(self, backbone: str = "resnet101", weights_path: Optional[Union[str, Path]] = None,
                 dmap_mode: str = "learned", temperature: float = 0.05, fixed_threshold: float = 0.9,
                 alpha: float = 10.0, ltg_dim: int = 64, xi_init: float = 0.5, out_dim: int = 512,
                 min_loaded_fraction: float = 0.9, bn_with_support: bool = True) -> None:
        super().__init__()
        if dmap_mode not in DMAP_MODES:
            raise ValueError(f"dmap_mode must be one of {DMAP_MODES}, got {dmap_mode!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.encoder = Encoder(backbone=backbone, weights_path=weights_path, out_dim=out_dim,
                               min_loaded_fraction=min_loaded_fraction)
        # LTG exists in every mode so that checkpoints are interchangeable; it only runs in "learned" and
        # its parameters are frozen (requires_grad False) otherwise, so DDP sees no unused parameters.
        self.ltg = LearnableThresholdGeneration(self.encoder.hidden_channels, dim=ltg_dim, xi_init=xi_init)
        self.dmap_mode = dmap_mode
        self.temperature = float(temperature)
        self.fixed_threshold = float(fixed_threshold)
        self.alpha = float(alpha)
        self.bn_with_support = bool(bn_with_support)

    @property
    def components(self) -> Components:
        """The model's components (:class:`models.components.Components`)."""
        return Components()

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any]) -> "FewShotSeg":
        """The model described by a ``model`` config sub-dict (as in a checkpoint's ``config["model"]``).

        ``model.method`` and its component keys choose the class: DMAP's own components give this class,
        any other bundle :class:`models.methods.MethodSeg`. A config without ``method`` (older checkpoints)
        describes DMAP.

        Raises:
            KeyError, ValueError: a missing key or a value that describes no model.
        """
        components = resolve_components(model_cfg)
        kwargs = dict(backbone=model_cfg["backbone"], weights_path=model_cfg.get("weights_path") or None,
                      dmap_mode=model_cfg["dmap_mode"], temperature=model_cfg["temperature"],
                      fixed_threshold=model_cfg["fixed_threshold"], alpha=model_cfg["alpha"],
                      min_loaded_fraction=model_cfg.get("min_loaded_fraction", 0.9),
                      bn_with_support=model_cfg.get("bn_with_support", True))
        if components.is_plain_dmap:
            return FewShotSeg(**kwargs)
        from models.methods import MethodSeg  # builds on this module

        return MethodSeg(components, **kwargs)

    @classmethod
    def from_checkpoint(cls, model_cfg: Mapping[str, Any], path: Union[str, Path],
                        state: Optional[Dict[str, Any]] = None) -> "FewShotSeg":
        """The model of ``model_cfg`` with every weight read from a checkpoint.

        No pretrained weights are loaded first (the checkpoint holds them all), and
        :func:`util.checkpoints.load_model_weights` refuses a file that does not fit the model.

        Args:
            model_cfg: the ``model`` config sub-dict (usually the checkpoint's own ``config["model"]``).
            path: the checkpoint file, named in errors.
            state: its content when already read (not read again).

        Raises:
            ValueError: one line naming the file: a config that describes no model, or weights that do not
                fit it.
        """
        try:
            with warnings.catch_warnings():  # "randomly initialised" is true only until the weights are loaded
                warnings.filterwarnings("ignore", message=".*randomly initialised.*")
                model = cls.from_config(dict(model_cfg, weights_path=""))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}: the checkpoint's config does not describe a model: {exc}") from None
        load_model_weights(model, path, state=state)
        return model

    @property
    def dmap_mode(self) -> str:
        """A value of ``DMAP_MODES``; setting it (re)freezes the LTG parameters outside the learned modes.

        A model whose ``ltg`` is registered as None (a method pooling without de-biasing) accepts ``off`` only.
        """
        return self._dmap_mode

    @dmap_mode.setter
    def dmap_mode(self, mode: str) -> None:
        if mode not in DMAP_MODES:
            raise ValueError(f"dmap_mode must be one of {DMAP_MODES}, got {mode!r}")
        ltg = self._modules.get("ltg")
        if ltg is None and mode != "off" and "ltg" in self._modules:
            raise ValueError(f"dmap_mode {mode!r} needs pooling 'dmap' (the threshold head); this model has none")
        self._dmap_mode = mode
        if ltg is not None:
            ltg.requires_grad_(mode in LTG_MODES)

    # ------------------------------------------------------------------ input handling
    @staticmethod
    def _as_batched(images: torch.Tensor, name: str) -> Tuple[torch.Tensor, bool]:
        if images.dim() == 4:
            return images.unsqueeze(0), False
        if images.dim() == 5:
            return images, True
        raise ValueError(f"{name} must be [N, 3, H, W] or [B, N, 3, H, W], got shape {tuple(images.shape)}")

    @staticmethod
    def _check(support_images: torch.Tensor, support_masks: torch.Tensor) -> None:
        b, s, _, h, w = support_images.shape
        if tuple(support_masks.shape) != (b, s, h, w):
            raise ValueError(f"support_masks shape {tuple(support_masks.shape)} does not match support "
                             f"images {tuple(support_images.shape)} (expected {(b, s, h, w)})")
        if s < 1:
            raise ValueError("at least one support shot is needed")

    # ------------------------------------------------------------------ public API
    def forward(self, support_images: torch.Tensor, support_masks: torch.Tensor,
                query_images: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Segments the queries of one episode (4-D inputs) or of a batch of episodes (5-D inputs).

        Args:
            support_images: [S, 3, H, W] or [B, S, 3, H, W].
            support_masks: [S, H, W] or [B, S, H, W], foreground 1 / background 0.
            query_images: [Q, 3, H, W] or [B, Q, 3, H, W].

        Returns:
            (probs [Q, 2, H, W] or [B, Q, 2, H, W] float32 (background, foreground), aux) with aux
            (detached, for logging): ``tau`` [Q] / [B, Q]; ``xi`` [Q] / [B, Q] (the threshold used:
            LTG output, ``fixed_threshold``, or -1 in ``off`` mode = keep everything);
            ``kept_fraction`` scalar: mean fraction of foreground support pixels kept (soft weight sum).
        """
        images, masks, b, s, q, batched = self._episode_inputs(support_images, support_masks, query_images)
        tau_start = 0 if (self.bn_with_support and self.training) else b * s
        enc = self.encoder(images, tau_start=tau_start)
        feats, hidden = enc["features"], enc["hidden"]
        encoding = self._support_from_features(feats[: b * s], [x[: b * s] for x in hidden], masks, b, batched)
        return self._segment_from_features(encoding, feats[b * s:], [x[b * s:] for x in hidden],
                                           enc["tau"][b * s - tau_start:], b, q)

    def encode_support(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> SupportEncoding:
        """Encodes the support once (e.g. for all query slices of an evaluation chunk).

        Args:
            support_images: [S, 3, H, W] or [B, S, 3, H, W].
            support_masks: [S, H, W] or [B, S, H, W].

        Returns:
            A :class:`SupportEncoding` for :meth:`segment`.
        """
        s_img, batched = self._as_batched(support_images, "support_images")
        masks = support_masks if batched else support_masks.unsqueeze(0)
        self._check(s_img, masks)
        b, s = s_img.shape[:2]
        enc = self.encoder(s_img.reshape(b * s, *s_img.shape[2:]), tau_start=b * s)
        return self._support_from_features(enc["features"], enc["hidden"], masks, b, batched)

    def segment(self, encoding: SupportEncoding,
                query_images: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Segments query images against an encoded support.

        In ``eval()`` mode this equals :meth:`forward` with the same support; in ``train()`` mode
        BatchNorm statistics differ (support and query are encoded separately).

        Args:
            encoding: from :meth:`encode_support`.
            query_images: [Q, 3, H, W] (4-D encoding) or [B, Q, 3, H, W] (5-D encoding).

        Returns:
            (probs, aux) as :meth:`forward`.
        """
        q_img = self._query_inputs(encoding, query_images)
        b, q = q_img.shape[:2]
        enc = self.encoder(q_img.reshape(b * q, *q_img.shape[2:]))
        return self._segment_from_features(encoding, enc["features"], enc["hidden"], enc["tau"], b, q)

    def training_loss(self, probs: torch.Tensor, aux: Dict[str, torch.Tensor], query_masks: torch.Tensor,
                      gamma: float = 0.7, class_weights: Sequence[float] = (0.1, 1.0),
                      normalize: str = "pixels") -> torch.Tensor:
        """The training loss of one batch of episodes, from :meth:`forward`'s outputs (train mode).

        DMAP: the focal loss of the queries (:func:`models.losses.episode_loss`).

        Args:
            probs: [B, Q, 2, H, W] from :meth:`forward` (5-D inputs).
            aux: its auxiliary outputs.
            query_masks: [B, Q, H, W] binary ground truth.
            gamma, class_weights: the query loss's focusing parameter (focal loss) and class weights
                (background, foreground).
            normalize: the focal loss's normalisation, ``pixels`` or ``classes``
                (:func:`models.losses.focal_loss`).

        Returns:
            Scalar loss.
        """
        return episode_loss(probs, query_masks, gamma, class_weights, normalize)

    # ------------------------------------------------------------------ internals
    def _episode_inputs(self, support_images: torch.Tensor, support_masks: torch.Tensor,
                        query_images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int, int, int, bool]:
        """Checked inputs of one episode or a batch, stacked for one encoder pass.

        Returns:
            (images [B*S + B*Q, 3, H, W]: the supports, then the queries; support masks [B, S, H, W]; B; S;
            Q; whether the inputs were 5-D).
        """
        s_img, batched = self._as_batched(support_images, "support_images")
        q_img, q_batched = self._as_batched(query_images, "query_images")
        masks = support_masks if batched else support_masks.unsqueeze(0)
        if batched != q_batched:
            raise ValueError("support_images and query_images must both be 4-D or both 5-D")
        self._check(s_img, masks)
        if q_img.shape[0] != s_img.shape[0] or q_img.shape[-2:] != s_img.shape[-2:]:
            raise ValueError(f"query_images {tuple(query_images.shape)} do not match support_images "
                             f"{tuple(support_images.shape)}")
        b, s, q = s_img.shape[0], s_img.shape[1], q_img.shape[1]
        images = torch.cat([s_img.reshape(b * s, *s_img.shape[2:]), q_img.reshape(b * q, *q_img.shape[2:])])
        return images, masks, b, s, q, batched

    def _query_inputs(self, encoding: SupportEncoding, query_images: torch.Tensor) -> torch.Tensor:
        """Checked 5-D view [B, Q, 3, H, W] of the query images of :meth:`segment`."""
        q_img, q_batched = self._as_batched(query_images, "query_images")
        if q_batched != encoding.batched:
            raise ValueError("query_images must be 5-D exactly when the support was 5-D")
        if q_img.shape[0] != encoding.features.shape[0] or tuple(q_img.shape[-2:]) != tuple(encoding.image_size):
            raise ValueError(f"query_images {tuple(query_images.shape)} do not match the support encoding "
                             f"(B={encoding.features.shape[0]}, size={encoding.image_size})")
        return q_img

    def _support_from_features(self, feats: torch.Tensor, hidden: List[torch.Tensor], masks: torch.Tensor,
                               b: int, batched: bool) -> SupportEncoding:
        """feats [B*S, C, h, w], hidden per level [B*S, C_l, h, w], masks [B, S, H, W]."""
        n, c, h, w = feats.shape
        s = n // b
        size = (masks.shape[-2], masks.shape[-1])
        dt = compute_dtype(feats)
        cosine = ltg_support = gate = None
        with no_autocast(feats.device):
            f = feats.to(dt).reshape(b, s, c, h, w)
            fg = (masks > 0.5).to(dt)
            prototype = masked_average_pooling(f, fg)
            if self.dmap_mode != "off":
                cosine = upsampled_cosine(f, prototype, size)
            if self.dmap_mode in LTG_MODES:
                gate = feature_cosine(f, prototype)
        if self.dmap_mode in LTG_MODES:
            part = self.ltg.support_part(hidden, (h, w))
            ltg_support = part.reshape(b, s, *part.shape[1:])
        return SupportEncoding(features=f, fg=fg, prototype=prototype, cosine=cosine, ltg_support=ltg_support,
                               gate=gate, batched=batched, image_size=size)

    def _select_prototypes(self, enc: SupportEncoding, hidden: List[torch.Tensor], b: int, q: int,
                           size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (de-biased) prototypes the queries are segmented with.

        Args:
            enc: the support encoding.
            hidden: the queries' hidden stages, per level [B*Q, C_l, h, w] (read in ``learned`` mode).
            b, q: episodes and queries per episode.
            size: (h, w) feature resolution.

        Returns:
            (prototypes [B, K, C] with K = 1, or Q in ``learned`` mode; kept fraction [B, K]; the threshold
            used per query xi [B, Q], -1 in ``off`` mode).
        """
        dt = enc.features.dtype
        device = enc.features.device
        if self.dmap_mode in LTG_MODES:
            part = self.ltg.query_part(hidden, size)
            xi = self.ltg(enc.ltg_support, enc.gate, part.reshape(b, q, *part.shape[1:])).to(dt)
        with no_autocast(device):
            if self.dmap_mode == "off":
                prototypes = enc.prototype[:, None]                                   # [B, 1, C]
                kept = enc.fg.new_ones(b, 1)
                xi = torch.full((b, q), -1.0, dtype=dt, device=device)
            elif self.dmap_mode == "fixed":
                thr = torch.full((b, 1), self.fixed_threshold, dtype=dt, device=device)
                prototypes, kept = debiased_prototypes(enc.features, enc.fg, enc.cosine, thr, soft=False)
                xi = thr.expand(b, q)
            else:
                soft = self.training
                prototypes, kept = debiased_prototypes(enc.features, enc.fg, enc.cosine, xi, soft=soft,
                                                       temperature=self.temperature,
                                                       straight_through=soft and self.dmap_mode == "learned_st")
        return prototypes, kept, xi

    def _segment_from_features(self, enc: SupportEncoding, feats: torch.Tensor, hidden: List[torch.Tensor],
                               tau: torch.Tensor, b: int, q: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """feats [B*Q, C, h, w], hidden per level [B*Q, C_l, h, w], tau [B*Q]."""
        _, c, h, w = feats.shape
        dt = enc.features.dtype
        prototypes, kept, xi = self._select_prototypes(enc, hidden, b, q, (h, w))
        with no_autocast(feats.device):
            fq = feats.to(dt).reshape(b, q, c, h, w)
            tau = tau.to(dt).reshape(b, q)
            cos = feature_cosine(fq, prototypes.expand(b, q, c))                      # [B, Q, h, w]
            p_fg = torch.sigmoid(self.alpha * cos + 0.5 * tau[..., None, None])
            p_fg = F.interpolate(p_fg, size=enc.image_size, mode="bilinear", align_corners=True)
            probs = torch.stack([1.0 - p_fg, p_fg], dim=2).float() if dt != torch.float64 else \
                torch.stack([1.0 - p_fg, p_fg], dim=2)                                # [B, Q, 2, H, W]
            has_fg = (enc.fg.sum(dim=(1, 2, 3)) > 0).to(dt)[:, None]
            kept_fraction = (kept * has_fg).sum() / (has_fg.sum() * kept.shape[1]).clamp_min(1.0)
        aux = {"tau": tau.detach(), "xi": xi.detach(), "kept_fraction": kept_fraction.detach()}
        if not enc.batched:
            probs = probs[0]
            aux["tau"], aux["xi"] = aux["tau"][0], aux["xi"][0]
        return probs, aux
