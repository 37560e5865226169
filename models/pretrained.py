"""Pretrained backbone weights by name: ``model.weights_path=coco`` or ``model.weights_path=imagenet``.

The names resolve through torchvision's weight enums to a file in the torch hub cache
(``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``), the same place
``torchvision`` itself uses, so weights downloaded once by any torchvision program are found. A missing file
is downloaded when the machine is online; offline, the error names the URL and the exact path where the file
can be put by hand. Any other non-empty ``weights_path`` value is a local file.

- ``coco``: DeepLabV3 COCO weights (the paper's initialisation); ResNet-101 and ResNet-50 only.
- ``imagenet``: the ImageNet-1k classification weights of the chosen ResNet.
"""
from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision.models as tvm
import torchvision.models.segmentation as tvs

LOGGER = logging.getLogger(__name__)

WEIGHT_NAMES = ("coco", "imagenet")


class WeightsUnavailable(ValueError):
    """A named weights file is neither cached nor downloadable."""


def _weights_enum(name: str, backbone: str):
    if name == "coco":
        enums = {"resnet101": tvs.DeepLabV3_ResNet101_Weights, "resnet50": tvs.DeepLabV3_ResNet50_Weights}
        if backbone not in enums:
            raise WeightsUnavailable(f"config key 'model.weights_path' is 'coco', but COCO (DeepLabV3) weights exist "
                                     f"for resnet101 and resnet50 only, not {backbone}; use 'imagenet'")
        return enums[backbone].COCO_WITH_VOC_LABELS_V1
    enums = {"resnet18": tvm.ResNet18_Weights, "resnet34": tvm.ResNet34_Weights,
             "resnet50": tvm.ResNet50_Weights, "resnet101": tvm.ResNet101_Weights}
    return enums[backbone].IMAGENET1K_V1


def weights_url(name: str, backbone: str) -> str:
    """Download URL of the named weights for ``backbone``."""
    if name not in WEIGHT_NAMES:
        raise ValueError(f"unknown weights name {name!r}; expected one of {WEIGHT_NAMES} or a file path")
    return _weights_enum(name, backbone).url


def cache_path(url: str) -> Path:
    """Where the torch hub cache keeps the file of ``url`` (follows ``$TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def resolve_named_weights(name: str, backbone: str, download: bool = True) -> Path:
    """Local path of the named weights, downloading them into the cache when missing and possible.

    Args:
        name: ``"coco"`` or ``"imagenet"``.
        backbone: ``resnet18`` | ``resnet34`` | ``resnet50`` | ``resnet101``.
        download: try to download a missing file (False: fail at once).

    Raises:
        WeightsUnavailable: one line naming the URL and the cache path to fill by hand.
    """
    url = weights_url(name, backbone)
    path = cache_path(url)
    if path.is_file():
        return path
    if download:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            LOGGER.info("downloading %s weights for %s from %s to %s", name, backbone, url, path)
            torch.hub.download_url_to_file(url, str(path), progress=False)
            return path
        except Exception as exc:  # noqa: BLE001 - any network failure means "not available here"
            reason = f"download failed ({type(exc).__name__})"
    else:
        reason = "not cached"
    raise WeightsUnavailable(f"config key 'model.weights_path' is {name!r}: {reason}; fetch {url} and put it at "
                             f"{path} (or set TORCH_HOME, or give a local file path)")
