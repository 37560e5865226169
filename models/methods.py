"""MethodSeg: ADNet, Q-Net, SSL-ALPNet and any other bundle of components on the shared encoder.

:meth:`models.fewshot.FewShotSeg.from_config` builds this class for every ``model`` config whose
components (:mod:`models.components`) are not exactly DMAP's. It keeps FewShotSeg's interface --
``forward`` for training, ``encode_support`` + ``segment`` for evaluation and prediction, ``training_loss``
for the loop -- and its encoder (dilated ResNet, layer3 reduced to 512 channels); what differs is chosen
per component:

* feature paths: ``layer3`` (the encoder's 512-channel features) and, for ``layer3+layer4``, a second path
  ``layer4 -> 1x1 convolution (no bias) -> 512 channels``; each path is pooled and predicted on its own and
  the foreground probabilities, upsampled to the image, are fused as ``a p_3 + (1 - a) p_4``;
* pooling: ``map``, ``dmap`` (FewShotSeg's de-biasing with ``model.dmap_mode``; the layer4 path is
  de-biased with the same threshold) or ``local`` (:func:`models.components.class_prototype_sets`);
* head: ``tau`` and ``threshold`` (:func:`models.components.offset_probability` with the query's tau or a
  learned scalar T) or ``assign`` (:func:`models.components.assignment_scores`, softmax over background and
  foreground);
* training: the alignment loss is computed in :meth:`MethodSeg.forward` (train mode) and combined with the
  query loss and the threshold loss in :meth:`MethodSeg.training_loss`;
* evaluation: with ``refine_iters`` > 0 every path's prototype is refined per query image
  (:func:`models.components.refine_prototypes`) before the final prediction, in ``eval()`` mode only.

Encoder parts a bundle never uses are frozen (``requires_grad`` False): layer4 without the ``tau`` head or
the layer4 path, the ResNet's ``fc`` and the tau head without the ``tau`` head; LTG exists only with
``dmap`` pooling. Every parameter that can learn gets a gradient at every step, so DistributedDataParallel
needs no unused-parameter search.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.components import (THRESHOLD_LOSS_SCALE, Components, assignment_scores, class_prototype_sets,
                               offset_probability, refine_prototypes)
from models.dmap import (debiased_prototypes, feature_cosine, masked_average_pooling, no_autocast,
                         upsampled_cosine)
from models.fewshot import FewShotSeg, SupportEncoding
from models.losses import clamped_log, episode_loss, episode_nll

PrototypeSet = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class PathSupport:
    """One feature path's support side.

    Attributes:
        features: [B, S, C, h, w] support features of the path (float32, float64 for float64 inputs).
        prototype: [B, C] masked-average prototype.
        cosine: [B, S, H, W] cosine to it at full resolution (``dmap`` pooling outside ``off`` mode), else None.
        sets: ((background prototypes [B, K_bg, C], valid [B, K_bg]), (foreground ..., ...)) for the
            ``assign`` head, else None.
    """

    features: torch.Tensor
    prototype: torch.Tensor
    cosine: Optional[torch.Tensor] = None
    sets: Optional[Tuple[PrototypeSet, PrototypeSet]] = None


@dataclass
class MethodSupportEncoding(SupportEncoding):
    """:class:`models.fewshot.SupportEncoding` (its fields describe the layer3 path) plus every path's own.

    Attributes:
        paths: one :class:`PathSupport` per feature path, layer3 first.
    """

    paths: List[PathSupport] = field(default_factory=list)


def _upsample(maps: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=True) resizing of [..., h, w] maps to [..., H, W]."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    return F.interpolate(flat, size=size, mode="bilinear", align_corners=True).reshape(*lead, *size)


class MethodSeg(FewShotSeg):
    """A few-shot segmenter assembled from components (ADNet, Q-Net, SSL-ALPNet, ablations).

    Args:
        components: the bundle (:func:`models.components.resolve_components`).
        backbone, weights_path, temperature, fixed_threshold, alpha, ltg_dim, xi_init, out_dim,
            min_loaded_fraction, bn_with_support: as :class:`models.fewshot.FewShotSeg`; ``alpha`` scales the
            cosine of the ``tau`` and ``threshold`` heads, ``bn_with_support`` matters only for the ``tau``
            head on the layer3 path alone (with the layer4 path, layer4 runs on every image).
        dmap_mode: the de-biasing of ``dmap`` pooling; ``off`` for any other pooling.
    """

    def __init__(self, components: Components, backbone: str = "resnet101", weights_path=None,
                 dmap_mode: str = "learned", temperature: float = 0.05, fixed_threshold: float = 0.9,
                 alpha: float = 10.0, ltg_dim: int = 64, xi_init: float = 0.5, out_dim: int = 512,
                 min_loaded_fraction: float = 0.9, bn_with_support: bool = True) -> None:
        pooling_dmap = components.pooling == "dmap"
        super().__init__(backbone=backbone, weights_path=weights_path, dmap_mode=dmap_mode if pooling_dmap else "off",
                         temperature=temperature, fixed_threshold=fixed_threshold, alpha=alpha, ltg_dim=ltg_dim,
                         xi_init=xi_init, out_dim=out_dim, min_loaded_fraction=min_loaded_fraction,
                         bn_with_support=bn_with_support)
        self._components = components
        self.method = components.method
        if not pooling_dmap:
            self.ltg = None
        self.path_names: Tuple[str, ...] = ("layer3", "layer4") if components.paths == "layer3+layer4" else ("layer3",)
        if "layer4" in self.path_names:
            self.reduce4 = nn.Conv2d(self.encoder.layer4_channels, out_dim, kernel_size=1, bias=False)
            nn.init.kaiming_normal_(self.reduce4.weight, mode="fan_out", nonlinearity="relu")
        else:
            self.reduce4 = None
        if components.head == "threshold":
            self.threshold = nn.Parameter(torch.tensor(float(components.threshold_init)))
        else:
            self.register_parameter("threshold", None)
        if components.head != "tau":
            self.encoder.tau_head.requires_grad_(False)
            self.encoder.backbone.fc.requires_grad_(False)
            if "layer4" not in self.path_names:
                self.encoder.backbone.layer4.requires_grad_(False)

    @property
    def components(self) -> Components:
        """The model's components."""
        return self._components

    # ------------------------------------------------------------------ public API
    def forward(self, support_images: torch.Tensor, support_masks: torch.Tensor,
                query_images: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """:meth:`FewShotSeg.forward` through the method's components (same arguments and shapes).

        Returns:
            (probs [Q, 2, H, W] or [B, Q, 2, H, W] float32 (background, foreground), aux). aux, detached:
            ``xi`` [Q] / [B, Q] (-1 without ``dmap`` pooling), ``kept_fraction`` scalar, ``tau`` [Q] / [B, Q]
            (``tau`` head), ``threshold`` scalar T (``threshold`` head); in train mode, for
            :meth:`training_loss` and with their graph: ``align_loss`` scalar (``align_weight`` > 0) and
            ``log_probs`` (``assign`` head on one path: exact log-softmax, same shape as probs).
        """
        images, masks, b, s, q, batched = self._episode_inputs(support_images, support_masks, query_images)
        enc, tau = self._encoder_pass(images, b * s)
        feats, hidden = self._path_features(enc), enc["hidden"]
        support = self._support([f[: b * s] for f in feats], [x[: b * s] for x in hidden], masks, b, batched)
        probs, aux, query_feats, offset = self._segment(support, [f[b * s:] for f in feats],
                                                        [x[b * s:] for x in hidden], tau, b, q)
        if self.training and self._components.align_weight > 0:
            aux["align_loss"] = self._alignment_loss(support, query_feats, probs, offset)
        return self._unbatch(probs, aux, batched)

    def encode_support(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> MethodSupportEncoding:
        """Encodes the support once (every path; the local prototype sets of the ``assign`` head).

        Args:
            support_images: [S, 3, H, W] or [B, S, 3, H, W].
            support_masks: [S, H, W] or [B, S, H, W].

        Returns:
            A :class:`MethodSupportEncoding` for :meth:`segment`; local prototypes use the window of the
            current mode (``local_window`` in training, ``local_window_eval`` in evaluation).
        """
        s_img, batched = self._as_batched(support_images, "support_images")
        masks = support_masks if batched else support_masks.unsqueeze(0)
        self._check(s_img, masks)
        b, s = s_img.shape[:2]
        enc, _ = self._encoder_pass(s_img.reshape(b * s, *s_img.shape[2:]), b * s)
        return self._support(self._path_features(enc), enc["hidden"], masks, b, batched)

    def segment(self, encoding: MethodSupportEncoding,
                query_images: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Segments query images against an encoded support (with Q-Net's refinement in ``eval()`` mode).

        Args:
            encoding: from :meth:`encode_support`.
            query_images: [Q, 3, H, W] (4-D encoding) or [B, Q, 3, H, W] (5-D encoding).

        Returns:
            (probs, aux) as :meth:`forward`, without the training entries.
        """
        q_img = self._query_inputs(encoding, query_images)
        b, q = q_img.shape[:2]
        enc, tau = self._encoder_pass(q_img.reshape(b * q, *q_img.shape[2:]), 0)
        probs, aux, _, _ = self._segment(encoding, self._path_features(enc), enc["hidden"], tau, b, q)
        return self._unbatch(probs, aux, encoding.batched)

    def training_loss(self, probs: torch.Tensor, aux: Dict[str, torch.Tensor], query_masks: torch.Tensor,
                      gamma: float = 0.7, class_weights: Sequence[float] = (0.1, 1.0),
                      normalize: str = "pixels") -> torch.Tensor:
        """Query loss + ``align_weight`` x alignment loss + ``threshold_loss_weight`` x T / 20.

        The query loss is the focal loss (``query_loss='focal'``, :func:`models.losses.episode_loss`) or the
        class-weighted NLL (``'nll'``, :func:`models.losses.episode_nll`) of ``log clamp(p)``, or of the exact
        ``aux['log_probs']`` when the model gives them.

        Args:
            probs: [B, Q, 2, H, W] from :meth:`forward` in train mode (5-D inputs).
            aux: its auxiliary outputs (``align_loss`` must be there when ``align_weight`` > 0); the entries
                with a graph are used here and then left detached (``align_loss``) or removed
                (``log_probs``), so what remains is for logging.
            query_masks: [B, Q, H, W] binary ground truth.
            gamma: the focal loss's focusing parameter.
            class_weights: (background, foreground) weights of the query loss.
            normalize: the query loss's normalisation, ``pixels`` or ``classes``.

        Returns:
            Scalar loss.
        """
        c = self._components
        log_probs = aux.pop("log_probs", None)
        if c.query_loss == "focal":
            loss = episode_loss(probs, query_masks, gamma, class_weights, normalize)
        else:
            loss = episode_nll(clamped_log(probs) if log_probs is None else log_probs, query_masks, class_weights,
                               normalize)
        if c.align_weight > 0:
            loss = loss + c.align_weight * aux["align_loss"]
            aux["align_loss"] = aux["align_loss"].detach()
        if c.threshold_loss_weight > 0:
            loss = loss + c.threshold_loss_weight * self.threshold / THRESHOLD_LOSS_SCALE
        return loss

    # ------------------------------------------------------------------ internals
    def _encoder_pass(self, images: torch.Tensor, n_support: int) -> Tuple[dict, Optional[torch.Tensor]]:
        """Encoder outputs for ``images`` (supports first) and the queries' tau [N - n_support] (``tau`` head)."""
        n = images.shape[0]
        layer4 = "layer4" in self.path_names
        if self._components.head != "tau":
            tau_start = n
        elif self.bn_with_support and self.training and not layer4:
            tau_start = 0
        else:
            tau_start = n_support
        enc = self.encoder(images, tau_start=tau_start, layer4=layer4)
        tau = enc["tau"][n_support - tau_start:] if self._components.head == "tau" else None
        return enc, tau

    def _path_features(self, enc: dict) -> List[torch.Tensor]:
        """Per path [N, C, h_n, w_n]: layer3's reduced features, then (layer4 path) reduce4(layer4)."""
        feats = [enc["features"]]
        if self.reduce4 is not None:
            feats.append(self.reduce4(enc["layer4"]))
        return feats

    def _support(self, feats: List[torch.Tensor], hidden: List[torch.Tensor], masks: torch.Tensor, b: int,
                 batched: bool) -> MethodSupportEncoding:
        """feats per path [B*S, C, h_n, w_n], hidden per level [B*S, C_l, h, w], masks [B, S, H, W]."""
        base = self._support_from_features(feats[0], hidden, masks, b, batched)
        paths = [PathSupport(base.features, base.prototype, base.cosine)]
        c = self._components
        with no_autocast(base.features.device):
            for f in feats[1:]:
                n, ch, h, w = f.shape
                f = f.to(base.features.dtype).reshape(b, n // b, ch, h, w)
                prototype = masked_average_pooling(f, base.fg)
                cosine = upsampled_cosine(f, prototype, base.image_size) if self.dmap_mode != "off" else None
                paths.append(PathSupport(f, prototype, cosine))
            if c.head == "assign":
                window = c.local_window if self.training else c.local_window_eval
                for path in paths:
                    path.sets = class_prototype_sets(path.features, base.fg, c.pooling == "local", window,
                                                     c.local_threshold)
        return MethodSupportEncoding(**{f.name: getattr(base, f.name) for f in fields(SupportEncoding)}, paths=paths)

    def _path_prototypes(self, path: PathSupport, fg: torch.Tensor, xi: torch.Tensor, b: int) -> torch.Tensor:
        """Prototypes [B, K, C] of a path after layer3 (the layer3 path's are FewShotSeg's selection)."""
        if self.dmap_mode == "off":
            return path.prototype[:, None]
        if self.dmap_mode == "fixed":
            thr = torch.full((b, 1), self.fixed_threshold, dtype=fg.dtype, device=fg.device)
            return debiased_prototypes(path.features, fg, path.cosine, thr, soft=False)[0]
        return debiased_prototypes(path.features, fg, path.cosine, xi, soft=self.training,
                                   temperature=self.temperature)[0]

    def _fuse(self, maps: List[torch.Tensor]) -> torch.Tensor:
        """``a maps[0] + (1 - a) maps[1]`` (a = ``fusion_weight``), or the single path's map."""
        if len(maps) == 1:
            return maps[0]
        a = self._components.fusion_weight
        return a * maps[0] + (1.0 - a) * maps[1]

    def _segment(self, enc: MethodSupportEncoding, feats: List[torch.Tensor], hidden: List[torch.Tensor],
                 tau: Optional[torch.Tensor], b: int, q: int):
        """Probabilities of the queries.

        Args:
            feats: per path [B*Q, C, h_n, w_n]; hidden: per level [B*Q, C_l, h, w]; tau: [B*Q] or None.

        Returns:
            (probs [B, Q, 2, H, W], aux (batched), query features per path [B, Q, C, h_n, w_n] (compute
            dtype), offset [B, Q] of the ``tau`` / ``threshold`` head or None).
        """
        c = self._components
        dt = enc.features.dtype
        size = enc.image_size
        aux: Dict[str, torch.Tensor] = {}
        if c.head != "assign":
            h, w = feats[0].shape[-2:]
            prototypes, kept, xi = self._select_prototypes(enc, hidden, b, q, (h, w))
        with no_autocast(enc.features.device):
            fq = [f.to(dt).reshape(b, q, *f.shape[1:]) for f in feats]
            if c.head == "assign":
                kept = enc.fg.new_ones(b, 1)
                xi = torch.full((b, q), -1.0, dtype=dt, device=enc.fg.device)
                offset = None
                logits = []
                for path, f in zip(enc.paths, fq):
                    (bg, bg_valid), (fg, fg_valid) = path.sets
                    scores = torch.stack([assignment_scores(f, bg, bg_valid, c.assign_scale),
                                          assignment_scores(f, fg, fg_valid, c.assign_scale)], dim=2)
                    logits.append(_upsample(scores, size))                                # [B, Q, 2, H, W]
                probs = self._fuse([torch.softmax(x, dim=2) for x in logits])
                if self.training and len(logits) == 1:
                    aux["log_probs"] = torch.log_softmax(logits[0], dim=2)
            else:
                if c.head == "tau":
                    offset = tau.to(dt).reshape(b, q)
                    aux["tau"] = offset.detach()
                else:
                    offset = self.threshold.to(dt).expand(b, q)
                    aux["threshold"] = self.threshold.detach()
                p_paths = []
                for i, (path, f) in enumerate(zip(enc.paths, fq)):
                    ch = f.shape[2]
                    protos = (prototypes if i == 0 else self._path_prototypes(path, enc.fg, xi, b)).expand(b, q, ch)
                    p_fg = offset_probability(feature_cosine(f, protos), offset, self.alpha)      # [B, Q, h, w]
                    if not self.training and c.refine_iters > 0:
                        n, (fh, fw) = b * q, f.shape[-2:]
                        refined = refine_prototypes(f.reshape(n, ch, fh, fw), protos.reshape(n, ch),
                                                    (p_fg > 0.5).reshape(n, fh, fw), c.refine_iters, c.refine_lr)
                        p_fg = offset_probability(feature_cosine(f, refined.reshape(b, q, ch)), offset, self.alpha)
                    p_paths.append(F.interpolate(p_fg, size=size, mode="bilinear", align_corners=True))
                p_fg = self._fuse(p_paths)
                probs = torch.stack([1.0 - p_fg, p_fg], dim=2)
            probs = probs.float() if dt != torch.float64 else probs
            has_fg = (enc.fg.sum(dim=(1, 2, 3)) > 0).to(dt)[:, None]
            kept_fraction = (kept * has_fg).sum() / (has_fg.sum() * kept.shape[1]).clamp_min(1.0)
        aux["xi"] = xi.detach()
        aux["kept_fraction"] = kept_fraction.detach()
        return probs, aux, fq, offset

    def _alignment_loss(self, enc: MethodSupportEncoding, query_feats: List[torch.Tensor], probs: torch.Tensor,
                        offset: Optional[torch.Tensor]) -> torch.Tensor:
        """Prototype alignment: the query, with its predicted mask as support, segments the support.

        The query prediction's argmax gives a mask; every path pools a query prototype (set) from it as the
        support side does (masked average; local prototype sets for ``local`` pooling), segments the
        support images through the same head (the offset: the episode's mean query tau, or T) and fusion,
        and the unweighted NLL against the support masks is averaged over pixels and shots. Episodes whose
        queries have no predicted foreground add 0; the sum is divided by the number of episodes.

        Args:
            enc: the support encoding (train mode).
            query_feats: per path [B, Q, C, h_n, w_n] query features (compute dtype).
            probs: [B, Q, 2, H, W] the query prediction.
            offset: [B, Q] the head's offset (None for ``assign``).

        Returns:
            Scalar loss.
        """
        c = self._components
        b = probs.shape[0]
        dt = enc.features.dtype
        size = enc.image_size
        with no_autocast(enc.features.device):
            predicted = (probs.detach().argmax(dim=2) == 1).to(dt)                      # [B, Q, H, W]
            has_fg = (predicted.sum(dim=(1, 2, 3)) > 0).to(dt)                          # [B]
            if c.head == "assign":
                logits = []
                for path, f in zip(enc.paths, query_feats):
                    (bg, bg_valid), (fg, fg_valid) = class_prototype_sets(f, predicted, c.pooling == "local",
                                                                          c.local_window, c.local_threshold)
                    scores = torch.stack([assignment_scores(path.features, bg, bg_valid, c.assign_scale),
                                          assignment_scores(path.features, fg, fg_valid, c.assign_scale)], dim=2)
                    logits.append(_upsample(scores, size))                                # [B, S, 2, H, W]
                if len(logits) == 1:
                    log_p = torch.log_softmax(logits[0], dim=2)
                else:
                    log_p = clamped_log(self._fuse([torch.softmax(x, dim=2) for x in logits]))
            else:
                episode_offset = offset.mean(dim=1)                                       # [B]
                maps = []
                for path, f in zip(enc.paths, query_feats):
                    prototype = masked_average_pooling(f, predicted)                      # [B, C]
                    s = path.features.shape[1]
                    p_fg = offset_probability(feature_cosine(path.features, prototype),
                                              episode_offset[:, None].expand(b, s), self.alpha)
                    maps.append(_upsample(p_fg, size))                                    # [B, S, H, W]
                p_fg = self._fuse(maps)
                log_p = clamped_log(torch.stack([1.0 - p_fg, p_fg], dim=2))
            target = enc.fg.long()                                                        # [B, S, H, W]
            nll = -log_p.gather(2, target[:, :, None]).squeeze(2).mean(dim=(1, 2, 3))    # [B]
            return (nll * has_fg).sum() / b

    @staticmethod
    def _unbatch(probs: torch.Tensor, aux: Dict[str, torch.Tensor],
                 batched: bool) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Drops the episode dimension of probs and the per-query entries for 4-D inputs."""
        if batched:
            return probs, aux
        for key in ("tau", "xi", "log_probs"):
            if key in aux:
                aux[key] = aux[key][0]
        return probs[0], aux
