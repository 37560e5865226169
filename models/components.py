"""The components few-shot methods are made of, and the methods as named bundles of them.

A method (``model.method``) is one choice per component (docs/methods.md):

============  ====================  ==========================  =================  ==========  =====================
method        pooling               head                        feature paths      query loss  extras
============  ====================  ==========================  =================  ==========  =====================
``dmap``      ``dmap`` (de-biased)  ``tau`` (query offset)      ``layer3``         ``focal``   --
``adnet``     ``map``               ``threshold`` (learned T)   ``layer3``         ``nll``     alignment, T / 20
``qnet``      ``map``               ``tau`` (query offset)      ``layer3+layer4``  ``nll``     alignment, refinement
``alpnet``    ``local``             ``assign`` (local scoring)  ``layer3``         ``nll``     alignment
============  ====================  ==========================  =================  ==========  =====================

Each component is a ``model`` config key; ``None`` takes the method's published choice and any other value
switches that component alone (an ablation). :func:`resolve_components` turns a ``model`` sub-dict into a
checked :class:`Components`.

The functions below are the components' mathematics on plain tensors (no module state), so each can be
tested on constructed inputs. Shapes: ``B`` episodes, ``S`` support shots, ``N`` images per episode
(shots or queries), ``K`` prototypes, ``C`` channels, ``h x w`` feature and ``H x W`` image resolution.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Tuple

import torch
import torch.nn.functional as F

from models.dmap import EPS, compute_dtype, masked_average_pooling, no_autocast

METHODS = ("dmap", "adnet", "qnet", "alpnet")
POOLINGS = ("map", "dmap", "local")
HEADS = ("tau", "threshold", "assign")
PATHS = ("layer3", "layer3+layer4")
QUERY_LOSSES = ("focal", "nll")

#: the components that differ between methods, as each method's public code chooses them
METHOD_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "dmap": dict(pooling="dmap", head="tau", paths="layer3", query_loss="focal", align_weight=0.0,
                 threshold_loss_weight=0.0, refine_iters=0),
    "adnet": dict(pooling="map", head="threshold", paths="layer3", query_loss="nll", align_weight=1.0,
                  threshold_loss_weight=1.0, refine_iters=0),
    "qnet": dict(pooling="map", head="tau", paths="layer3+layer4", query_loss="nll", align_weight=1.0,
                 threshold_loss_weight=0.0, refine_iters=7),
    "alpnet": dict(pooling="local", head="assign", paths="layer3", query_loss="nll", align_weight=1.0,
                   threshold_loss_weight=0.0, refine_iters=0),
}

#: the query loss's class weights (background, foreground) of each method's public training script
METHOD_CLASS_WEIGHTS: Dict[str, Tuple[float, float]] = {
    "dmap": (0.1, 1.0), "adnet": (0.1, 1.0), "qnet": (0.1, 1.0), "alpnet": (0.05, 1.0)}

#: components whose published value is the same wherever they are used
SHARED_DEFAULTS: Dict[str, Any] = dict(fusion_weight=0.9, threshold_init=-10.0, assign_scale=20.0, local_window=8,
                                       local_window_eval=4, local_threshold=0.95, refine_lr=0.01)

#: ADNet's cosine scale: its threshold loss is T / 20
THRESHOLD_LOSS_SCALE = 20.0


@dataclass(frozen=True)
class Components:
    """One choice per component (the ``model`` keys of the same names).

    Attributes:
        method: ``dmap``, ``adnet``, ``qnet`` or ``alpnet`` (where the defaults came from).
        pooling: ``map`` (masked average), ``dmap`` (de-biased, ``model.dmap_mode``) or ``local`` (local
            window prototypes plus the global one, ALPNet).
        head: ``tau`` (``sigmoid(alpha cos + tau / 2)``, tau from the query's layer4), ``threshold`` (the same
            with one learned scalar T, ADNet) or ``assign`` (softmax over classes of the softmax-weighted
            scaled cosines to each class's prototypes, ALPNet).
        paths: ``layer3`` or ``layer3+layer4`` (a second path on layer4, fused, Q-Net).
        query_loss: ``focal`` (``loss.gamma``) or ``nll`` (weighted negative log-likelihood).
        align_weight: weight of the prototype alignment loss (0: not computed).
        threshold_loss_weight: weight of ADNet's threshold loss T / 20 (``threshold`` head only).
        refine_iters: Adam steps of Q-Net's test-time prototype refinement (0: none).
        fusion_weight: a in ``a p_layer3 + (1 - a) p_layer4``.
        threshold_init: initial T of the ``threshold`` head.
        assign_scale: cosine scale of the ``assign`` head.
        local_window: local pooling window in feature cells while training.
        local_window_eval: the window in evaluation.
        local_threshold: a window becomes a local prototype when its mask fraction exceeds this.
        refine_lr: Adam learning rate of the refinement.
    """

    method: str = "dmap"
    pooling: str = "dmap"
    head: str = "tau"
    paths: str = "layer3"
    query_loss: str = "focal"
    align_weight: float = 0.0
    threshold_loss_weight: float = 0.0
    refine_iters: int = 0
    fusion_weight: float = 0.9
    threshold_init: float = -10.0
    assign_scale: float = 20.0
    local_window: int = 8
    local_window_eval: int = 4
    local_threshold: float = 0.95
    refine_lr: float = 0.01

    @property
    def is_plain_dmap(self) -> bool:
        """Whether these are exactly DMAP's components (the model is then :class:`models.fewshot.FewShotSeg`)."""
        differing = {key: value for key, value in METHOD_DEFAULTS["dmap"].items() if getattr(self, key) != value}
        return self.method == "dmap" and not differing

    def as_config(self) -> Dict[str, Any]:
        """The ``model`` keys with every value filled in."""
        return asdict(self)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resolve_components(model_cfg: Mapping[str, Any]) -> Components:
    """The components a ``model`` config sub-dict describes, with each method's defaults filled in.

    Keys that are absent or None take the method's published choice; a config without ``method`` (a
    checkpoint from before methods existed) is DMAP.

    Raises:
        ValueError: one line naming the first bad key (``config key 'model.<key>' is ...; expected ...``).
    """
    method = model_cfg.get("method") or "dmap"
    if method not in METHODS:
        raise ValueError(f"config key 'model.method' is {method!r}; expected one of {METHODS}")
    values: Dict[str, Any] = {"method": method}
    for key, default in {**METHOD_DEFAULTS[method], **SHARED_DEFAULTS}.items():
        given = model_cfg.get(key)
        values[key] = default if given is None else given

    def bad(key: str, expected: str) -> ValueError:
        return ValueError(f"config key 'model.{key}' is {values[key]!r}; expected {expected}")

    for key, choices in (("pooling", POOLINGS), ("head", HEADS), ("paths", PATHS), ("query_loss", QUERY_LOSSES)):
        if values[key] not in choices:
            raise bad(key, f"one of {choices}")
    for key in ("align_weight", "threshold_loss_weight"):
        if not (_is_number(values[key]) and values[key] >= 0):
            raise bad(key, "a number >= 0")
    if not (_is_number(values["fusion_weight"]) and 0 <= values["fusion_weight"] <= 1):
        raise bad("fusion_weight", "a number in [0, 1]")
    if not _is_number(values["threshold_init"]):
        raise bad("threshold_init", "a number")
    for key in ("assign_scale", "refine_lr"):
        if not (_is_number(values[key]) and values[key] > 0):
            raise bad(key, "a number > 0")
    for key in ("local_window", "local_window_eval"):
        if not (_is_int(values[key]) and values[key] >= 1):
            raise bad(key, "an integer >= 1")
    if not (_is_number(values["local_threshold"]) and 0 <= values["local_threshold"] < 1):
        raise bad("local_threshold", "a number in [0, 1)")
    if not (_is_int(values["refine_iters"]) and values["refine_iters"] >= 0):
        raise bad("refine_iters", "an integer >= 0")
    # combinations that describe no model
    if values["head"] == "assign" and values["pooling"] == "dmap":
        raise bad("pooling", "'map' or 'local' with model.head='assign'")
    if values["head"] != "assign" and values["pooling"] == "local":
        raise bad("pooling", "'map' or 'dmap' with model.head='tau' or 'threshold' (local prototypes need "
                             "model.head='assign')")
    if values["refine_iters"] and values["head"] == "assign":
        raise bad("refine_iters", "0 with model.head='assign' (refinement acts on a single prototype per path)")
    if values["threshold_loss_weight"] and values["head"] != "threshold":
        raise bad("threshold_loss_weight", "0 unless model.head='threshold' (it is a loss on the learned T)")
    numbers = {k: float(values[k]) for k in ("align_weight", "threshold_loss_weight", "fusion_weight",
                                               "threshold_init", "assign_scale", "local_threshold", "refine_lr")}
    return Components(**{**values, **numbers})


# ---------------------------------------------------------------------------------------------- heads
def offset_probability(cosine: torch.Tensor, offset: torch.Tensor, alpha: float) -> torch.Tensor:
    """Foreground probability of the ``tau`` and ``threshold`` heads: ``sigmoid(alpha cos + offset / 2)``.

    With ADNet's anomaly score ``S = -2 alpha cos`` (alpha = 10: ``S = -20 cos``) this is its
    ``1 - sigmoid(0.5 (S - T))`` with ``offset = T``.

    Args:
        cosine: [B, N, h, w].
        offset: [B, N] (the query's tau, or T expanded).
        alpha: cosine scale.

    Returns:
        [B, N, h, w].
    """
    return torch.sigmoid(alpha * cosine + 0.5 * offset[..., None, None])


def assignment_scores(features: torch.Tensor, prototypes: torch.Tensor, valid: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """A class's score by prototype assignment: ``sum_k softmax_k(d)_k d_k`` with ``d_k = scale cos(f, P_k)``.

    Args:
        features: [B, N, C, h, w].
        prototypes: [B, K, C] the class's prototypes (padded).
        valid: [B, K] which of them exist (at least one per episode).
        scale: cosine scale.

    Returns:
        [B, N, h, w] scores (logits of the class).
    """
    f = features / features.norm(dim=2, keepdim=True).clamp_min(EPS)
    p = prototypes / prototypes.norm(dim=2, keepdim=True).clamp_min(EPS)
    d = scale * torch.einsum("bnchw,bkc->bnkhw", f, p)                           # [B, N, K, h, w]
    keep = valid[:, None, :, None, None]
    weights = torch.softmax(d.masked_fill(~keep, float("-inf")), dim=2)
    return (weights * d.masked_fill(~keep, 0.0)).sum(dim=2)


# ---------------------------------------------------------------------------------------------- pooling
def area_fraction(masks: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Share of each feature cell's image pixels inside the mask (area resampling).

    Args:
        masks: [..., H, W] binary masks.
        size: (h, w) feature resolution.

    Returns:
        [..., h, w] in [0, 1].
    """
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:])
    return F.interpolate(flat, size=size, mode="area").reshape(*lead, *size)


def local_prototypes(features: torch.Tensor, masks: torch.Tensor, window: int,
                     threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Local prototypes: window averages of the features where the window is (almost) inside the mask.

    The mask is resampled to the feature grid by area; features and mask are average-pooled in
    non-overlapping ``window x window`` cells (cells left over at the right and bottom edges are dropped);
    a window whose mask fraction exceeds ``threshold`` gives one prototype. All shots' windows are pooled.

    Args:
        features: [B, S, C, h, w].
        masks: [B, S, H, W] binary masks.
        window: pooling window in feature cells (shrunk to the feature map when larger).
        threshold: minimum mask fraction (exclusive).

    Returns:
        (prototypes [B, K, C] padded with zeros, valid [B, K] bool); K = the largest count over the batch
        (0 when no window qualifies anywhere).
    """
    b, s, c, h, w = features.shape
    k = max(1, min(window, h, w))
    fraction = area_fraction(masks.to(features.dtype), (h, w))                   # [B, S, h, w]
    pooled = F.avg_pool2d(features.reshape(b * s, c, h, w), k)                     # [B*S, C, h', w']
    pooled_mask = F.avg_pool2d(fraction.reshape(b * s, 1, h, w), k)                # [B*S, 1, h', w']
    cells = pooled.reshape(b, s, c, -1).permute(0, 1, 3, 2).reshape(b, -1, c)     # [B, S*h'*w', C]
    chosen = (pooled_mask.reshape(b, -1) > threshold)                              # [B, S*h'*w']
    n_max = int(chosen.sum(dim=1).max().item()) if chosen.numel() else 0
    prototypes = features.new_zeros(b, n_max, c)
    valid = torch.zeros(b, n_max, dtype=torch.bool, device=features.device)
    for i in range(b):
        picked = cells[i][chosen[i]]
        prototypes[i, : picked.shape[0]] = picked
        valid[i, : picked.shape[0]] = True
    return prototypes, valid


def class_prototype_sets(features: torch.Tensor, fg: torch.Tensor, local: bool, window: int,
                         threshold: float) -> Tuple[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    """The background and foreground prototype sets of the ``assign`` head.

    Foreground: the local prototypes of the foreground and its global masked-average prototype (only the
    global one when no window qualifies). Background: the local prototypes of the background, or its
    global masked-average prototype when no window qualifies. Without ``local``, each class has its
    global prototype alone.

    Args:
        features: [B, S, C, h, w].
        fg: [B, S, H, W] binary foreground masks (the background is ``1 - fg``).
        local: add local prototypes.
        window, threshold: see :func:`local_prototypes`.

    Returns:
        ((bg prototypes [B, K_bg, C], valid [B, K_bg]), (fg prototypes [B, K_fg, C], valid [B, K_fg])).
    """
    bg = 1.0 - fg
    glob_fg = masked_average_pooling(features, fg)[:, None]                        # [B, 1, C]
    glob_bg = masked_average_pooling(features, bg)[:, None]
    ones = torch.ones(features.shape[0], 1, dtype=torch.bool, device=features.device)
    if not local:
        return (glob_bg, ones), (glob_fg, ones)
    fg_local, fg_valid = local_prototypes(features, fg, window, threshold)
    bg_local, bg_valid = local_prototypes(features, bg, window, threshold)
    fg_set = (torch.cat([fg_local, glob_fg], 1), torch.cat([fg_valid, ones], 1))
    none_bg = ~bg_valid.any(dim=1, keepdim=True)                                   # [B, 1]
    bg_set = (torch.cat([bg_local, glob_bg], 1), torch.cat([bg_valid, none_bg], 1))
    return bg_set, fg_set


# ---------------------------------------------------------------------------------------------- refinement
def refine_prototypes(features: torch.Tensor, prototypes: torch.Tensor, fg: torch.Tensor, iters: int,
                      lr: float) -> torch.Tensor:
    """Q-Net's test-time refinement of one prototype per query image.

    The query features are min-max normalised per image (over channels and positions); the target is
    ``sigmoid`` of them. The prototype replaces the features at the predicted-foreground positions, the
    result is normalised with the same minimum and maximum, and ``iters`` Adam steps minimise the binary
    cross-entropy between its ``sigmoid`` and the target (mean over channels and positions, summed over
    images, so each prototype moves by its own image alone). Runs with gradients enabled even when called
    under ``torch.no_grad`` or ``torch.inference_mode``, in float32/float64 without autocast.

    Args:
        features: [N, C, h, w] query features of one path.
        prototypes: [N, C] the prototype each query image was segmented with.
        fg: [N, h, w] predicted foreground (bool or 0/1).
        iters: Adam steps (0: the prototypes come back unchanged).
        lr: Adam learning rate.

    Returns:
        [N, C] refined prototypes (no autograd history).
    """
    if iters <= 0:
        return prototypes
    dt = compute_dtype(features)
    with torch.inference_mode(False), torch.enable_grad(), no_autocast(features.device):
        f = features.detach().clone().to(dt)
        m = fg.detach().clone().to(dt)[:, None]                                  # [N, 1, h, w]
        low = f.amin(dim=(1, 2, 3), keepdim=True)
        span = (f.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(EPS)
        target = torch.sigmoid((f - low) / span)
        proto = prototypes.detach().clone().to(dt).requires_grad_(True)
        optimizer = torch.optim.Adam([proto], lr=lr)
        for _ in range(iters):
            replaced = f * (1.0 - m) + proto[:, :, None, None] * m
            guess = torch.sigmoid((replaced - low) / span)
            loss = F.binary_cross_entropy(guess, target, reduction="none").mean(dim=(1, 2, 3)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return proto.detach().clone()

