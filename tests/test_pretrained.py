"""Weights by name (coco / imagenet) from the torch hub cache; never touches the network."""
from __future__ import annotations

import pytest
import torch
import torchvision

import models.pretrained as pretrained
from config import ConfigError, build_config, resolve_config
from models.fewshot import FewShotSeg
from models.pretrained import WeightsUnavailable, cache_path, resolve_named_weights, weights_url


@pytest.fixture()
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(url, dst, progress=True):
        raise ConnectionError(f"no network in tests ({url})")

    monkeypatch.setattr(pretrained.torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch_home"


def test_cache_path_follows_torch_home(torch_home):
    url = weights_url("imagenet", "resnet18")
    assert url.endswith("resnet18-f37072fd.pth")
    assert cache_path(url) == torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert weights_url("coco", "resnet101").endswith("deeplabv3_resnet101_coco-586e9e4e.pth")


def test_cached_imagenet_file_is_loaded_by_name(torch_home):
    torch.manual_seed(1)
    source = torchvision.models.resnet18()
    path = cache_path(weights_url("imagenet", "resnet18"))
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)
    cfg = resolve_config(build_config(["smoke"], {"model": {"weights_path": "imagenet"}}), need_data=False)
    assert cfg["model"]["weights_path"] == str(path)
    model = FewShotSeg(backbone="resnet18", weights_path=cfg["model"]["weights_path"])
    torch.testing.assert_close(model.encoder.backbone.conv1.weight, source.conv1.weight)


def test_cached_coco_file_in_deeplab_layout_is_loaded_by_name(torch_home):
    source = torchvision.models.resnet50()
    path = cache_path(weights_url("coco", "resnet50"))
    path.parent.mkdir(parents=True)
    torch.save({f"backbone.{k}": v for k, v in source.state_dict().items() if not k.startswith("fc.")}, path)
    assert resolve_named_weights("coco", "resnet50") == path
    model = FewShotSeg(backbone="resnet50", weights_path=str(path))
    torch.testing.assert_close(model.encoder.backbone.layer4[2].conv3.weight, source.layer4[2].conv3.weight)


def test_offline_and_not_cached_names_url_and_path(torch_home):
    cfg = build_config(["smoke"], {"model": {"weights_path": "coco", "backbone": "resnet101"}})
    with pytest.raises(ConfigError) as info:
        resolve_config(cfg, need_data=False)
    message = str(info.value)
    expected = torch_home / "hub" / "checkpoints" / "deeplabv3_resnet101_coco-586e9e4e.pth"
    assert "https://download.pytorch.org/models/deeplabv3_resnet101_coco-586e9e4e.pth" in message
    assert str(expected) in message and "\n" not in message
    assert not expected.exists()


def test_coco_for_a_small_backbone_is_refused(torch_home):
    with pytest.raises(WeightsUnavailable, match="resnet101 and resnet50 only"):
        resolve_named_weights("coco", "resnet18")
