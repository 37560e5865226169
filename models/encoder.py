"""Dilated ResNet encoder with the 512-channel feature reduction and the query-threshold (tau) head.

The backbone is a torchvision ResNet whose layer2 and layer3 are dilated instead of strided, so that a
256 x 256 input gives layer1..layer3 at 64 x 64 (output stride 4) and layer4 at 32 x 32 (output stride 8):

=========  ===========================  ===========================
stage      resnet50 / resnet101          resnet18 / resnet34
=========  ===========================  ===========================
layer1     [B, 256, H/4, W/4]            [B, 64, H/4, W/4]
layer2     [B, 512, H/4, W/4]            [B, 128, H/4, W/4]
layer3     [B, 1024, H/4, W/4]           [B, 256, H/4, W/4]
layer4     [B, 2048, H/8, W/8]           [B, 512, H/8, W/8]
=========  ===========================  ===========================

A bias-free 1x1 convolution reduces layer3 to ``out_dim`` (512) channels: the features used for the
prototypes and the prediction. The threshold head follows the public DMAP/ADNet code: global average pool
of layer4 -> the ResNet's own ``fc`` (to 1000) -> ``Linear(1000, 1)`` = tau.

Weights come from a local file (no downloads): torchvision's DeepLabv3-ResNet COCO checkpoint (keys
``backbone.*``, the ``classifier.*`` keys are ignored) or an ImageNet ResNet checkpoint (plain keys).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

logger = logging.getLogger(__name__)

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")

# Prefixes stripped from checkpoint keys, in order (DDP "module.", our own Encoder "backbone.", ...).
_KEY_PREFIXES = ("module.", "encoder.", "backbone.")


def _dilate_basic_layer(layer: nn.Sequential, first_dilation: int, dilation: int) -> None:
    """Turns a stride-2 BasicBlock layer into a stride-1 dilated one, in place.

    torchvision's ``BasicBlock`` refuses ``dilation > 1``; this mirrors what ``_make_layer(dilate=True)``
    does for Bottleneck layers: the first block keeps the previous dilation (its stride is removed), the
    following blocks use the new dilation. Padding equals dilation so spatial sizes are preserved.

    Args:
        layer: a torchvision ResNet ``layerN`` made of BasicBlocks.
        first_dilation: dilation of the first block's 3x3 convolutions.
        dilation: dilation of the remaining blocks' 3x3 convolutions.
    """
    for index, block in enumerate(layer):
        d = first_dilation if index == 0 else dilation
        for conv in (block.conv1, block.conv2):
            conv.stride = (1, 1)
            conv.dilation = (d, d)
            conv.padding = (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        block.stride = 1


def build_dilated_resnet(backbone: str = "resnet101") -> torchvision.models.ResNet:
    """Builds a randomly initialised torchvision ResNet with layer2 and layer3 dilated.

    Args:
        backbone: one of ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``.

    Returns:
        The ResNet (with its ``fc``); layer3 has output stride 4 and layer4 output stride 8.

    Raises:
        ValueError: unknown backbone name.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    constructor = getattr(torchvision.models, backbone)
    if backbone in ("resnet50", "resnet101"):
        return constructor(weights=None, replace_stride_with_dilation=[True, True, False])
    model = constructor(weights=None)
    _dilate_basic_layer(model.layer2, first_dilation=1, dilation=2)
    _dilate_basic_layer(model.layer3, first_dilation=2, dilation=4)
    return model


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (PyTorch >= 1.6) or, in the legacy format, a pickle (byte 0x80)."""
    import zipfile

    with open(path, "rb") as handle:
        first = handle.read(1)
    return first == b"\x80" or zipfile.is_zipfile(path)


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """Reads a checkpoint file and returns its flat tensor mapping (unwrapping ``state_dict``/``model``)."""
    if not _looks_like_torch_file(path):
        raise ValueError(f"{path}: not a PyTorch checkpoint (expected a file written by torch.save)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: checkpoint is a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _KEY_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                changed = True
    return key


def load_backbone_weights(module: nn.Module, path: Union[str, Path], min_fraction: float = 0.9) -> int:
    """Loads ResNet weights from a local checkpoint into ``module`` (a torchvision ResNet).

    Both layouts load: torchvision's DeepLabv3 COCO checkpoint (``backbone.conv1.weight``, ...; the
    ``classifier``/``aux_classifier`` heads have no counterpart and are ignored) and the ImageNet
    ResNet checkpoint (``conv1.weight``, ..., ``fc.weight``). ``module.``/``encoder.`` prefixes (DDP or
    our own Encoder checkpoints) are stripped too. Parameters and buffers (BatchNorm statistics) count.

    Args:
        module: the ResNet to load into (e.g. ``Encoder.backbone``).
        path: local checkpoint file.
        min_fraction: share of the backbone's tensors the file must provide, counting neither ``fc`` (absent
            from DeepLabv3 checkpoints) nor the ``num_batches_tracked`` counters (absent from older ImageNet
            files). 0 accepts any partial file.

    Returns:
        Number of tensors loaded (logged at INFO together with the backbone tensors left untouched).

    Raises:
        FileNotFoundError: the file does not exist (the message names the path).
        ValueError: unreadable file, shape mismatch of a matching key (all listed), no key matches, or
            fewer matches than ``min_fraction`` asks (the counts are named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    source = _read_state_dict(path)
    target = module.state_dict()
    matched: Dict[str, torch.Tensor] = {}
    mismatched: List[str] = []
    for key, tensor in source.items():
        name = _strip_prefixes(key)
        if name not in target or name in matched:
            continue
        if tuple(tensor.shape) != tuple(target[name].shape):
            mismatched.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(target[name].shape)}")
            continue
        matched[name] = tensor
    if mismatched:
        shown = "; ".join(mismatched[:5]) + (f"; ... ({len(mismatched)} in all)" if len(mismatched) > 5 else "")
        raise ValueError(f"{path}: shape mismatch for {len(mismatched)} tensor(s): {shown}")
    if not matched:
        example = ", ".join(list(source)[:3]) or "<no tensors>"
        raise ValueError(
            f"{path}: no tensor matches the {type(module).__name__} backbone "
            f"(file keys look like: {example}); expected ImageNet keys ('conv1.weight') or "
            f"DeepLabv3 keys ('backbone.conv1.weight')"
        )
    counted = [k for k in target if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    n_counted = sum(k in matched for k in counted)
    if n_counted < min_fraction * len(counted):
        raise ValueError(
            f"{path}: only {n_counted} of the backbone's {len(counted)} tensors (fc and batch counters aside) "
            f"are in the file, below model.min_loaded_fraction={min_fraction:g}; is it a "
            f"{type(module).__name__} checkpoint of this depth? (model.min_loaded_fraction=0 loads it anyway)")
    with torch.no_grad():
        for name, tensor in matched.items():
            target[name].copy_(tensor.to(dtype=target[name].dtype))
    missing = sorted(set(target) - set(matched))
    logger.info("loaded %d tensors from %s into the backbone (%d backbone tensors not in the file%s)",
                len(matched), path, len(missing), f", e.g. {missing[0]}" if missing else "")
    non_fc_missing = [k for k in missing if not k.startswith("fc.")]
    if non_fc_missing:
        logger.warning("%s: %d backbone tensors (besides fc) not found in the file, e.g. %s",
                       path, len(non_fc_missing), non_fc_missing[0])
    return len(matched)


class Encoder(nn.Module):
    """Dilated ResNet encoder: 512-channel features, hidden stages for LTG and the tau head.

    Args:
        backbone: ``resnet101`` (default, the paper), ``resnet50``, ``resnet34`` or ``resnet18``.
        weights_path: local checkpoint (DeepLabv3 COCO or ImageNet layout); ``None`` or ``""`` gives
            random initialisation and one ``UserWarning``.
        out_dim: channels of the reduced features.
        min_loaded_fraction: see :func:`load_backbone_weights` (``min_fraction``).

    Attributes:
        hidden_channels: channels of the ``hidden`` stages (layer1, layer2, layer3).
        layer4_channels: channels of layer4.
        weights_loaded: number of tensors loaded from ``weights_path`` (0 without a file).
    """

    def __init__(self, backbone: str = "resnet101", weights_path: Optional[Union[str, Path]] = None,
                 out_dim: int = 512, min_loaded_fraction: float = 0.9) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.backbone = build_dilated_resnet(backbone)
        expansion = 4 if backbone in ("resnet50", "resnet101") else 1
        self.hidden_channels = [64 * expansion, 128 * expansion, 256 * expansion]
        self.layer4_channels = 512 * expansion
        self.out_dim = out_dim
        self.reduce = nn.Conv2d(self.hidden_channels[-1], out_dim, kernel_size=1, bias=False)
        nn.init.kaiming_normal_(self.reduce.weight, mode="fan_out", nonlinearity="relu")
        self.tau_head = nn.Linear(self.backbone.fc.out_features, 1)
        assert self.backbone.fc.in_features == self.layer4_channels
        self.weights_loaded = 0
        if weights_path:
            self.weights_loaded = load_backbone_weights(self.backbone, weights_path, min_loaded_fraction)
        else:
            warnings.warn(f"Encoder({backbone}): no weights_path given, the backbone is randomly initialised",
                          UserWarning, stacklevel=2)

    def forward(self, x: torch.Tensor, tau_start: int = 0, layer4: bool = False) -> Dict[str, object]:
        """Encodes a batch of images.

        Args:
            x: images [B, 3, H, W] (any memory format).
            tau_start: tau is computed only for ``x[tau_start:]`` (the support images of an episode need no
                tau); without ``layer4`` so is layer4 (skipping the supports' saves about a tenth of the
                compute).
            layer4: compute layer4 for every image and return it (a second feature path).

        Returns:
            dict with ``features`` [B, out_dim, H/4, W/4] (input dtype, or the autocast dtype),
            ``hidden``: list [layer1, layer2, layer3] of [B, C_l, H/4, W/4], ``tau`` [B - tau_start]
            float32 and, with ``layer4``, ``layer4`` [B, C_4, H/8, W/8].
        """
        bb = self.backbone
        y = bb.maxpool(bb.relu(bb.bn1(bb.conv1(x))))
        l1 = bb.layer1(y)
        l2 = bb.layer2(l1)
        l3 = bb.layer3(l2)
        features = self.reduce(l3)
        out: Dict[str, object] = {"features": features, "hidden": [l1, l2, l3]}
        if layer4:
            l4 = bb.layer4(l3)
            out["layer4"] = l4
            l4_tau = l4[tau_start:]
            out["tau"] = self._tau(l4_tau) if l4_tau.shape[0] > 0 else features.new_zeros(0, dtype=torch.float32)
            return out
        l3_tau = l3[tau_start:] if tau_start else l3
        if l3_tau.shape[0] > 0:
            out["tau"] = self._tau(bb.layer4(l3_tau))
        else:
            out["tau"] = features.new_zeros(0, dtype=torch.float32)
        return out

    def _tau(self, l4: torch.Tensor) -> torch.Tensor:
        """tau [N] float32 from layer4 [N, C_4, h, w]: average pool, the ResNet's fc, the linear head."""
        pooled = torch.flatten(F.adaptive_avg_pool2d(l4, 1), 1)
        return self.tau_head(self.backbone.fc(pooled)).squeeze(1).float()
