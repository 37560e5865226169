"""Tests for models/encoder.py: shapes, dilation of the small backbones, checkpoint loading."""
import logging
import warnings

import pytest
import torch
import torchvision

from models.encoder import Encoder, build_dilated_resnet, load_backbone_weights

pytestmark = pytest.mark.filterwarnings("ignore:Encoder.*randomly initialised:UserWarning")


@pytest.mark.parametrize("backbone,hidden", [("resnet18", [64, 128, 256]), ("resnet34", [64, 128, 256]),
                                             ("resnet50", [256, 512, 1024])])
def test_shapes_64(backbone, hidden):
    torch.manual_seed(0)
    enc = Encoder(backbone).eval()
    with torch.no_grad():
        out = enc(torch.randn(2, 3, 64, 64))
    assert out["features"].shape == (2, 512, 16, 16)
    assert [tuple(h.shape) for h in out["hidden"]] == [(2, c, 16, 16) for c in hidden]
    assert out["tau"].shape == (2,) and out["tau"].dtype == torch.float32
    assert enc.hidden_channels == hidden


def test_small_backbone_strides_match_dilated_resnet50():
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for name in ("resnet18", "resnet50"):
            m = build_dilated_resnet(name).eval()
            y = m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))
            y3 = m.layer3(y)
            y4 = m.layer4(y3)
            assert y.shape[-2:] == y3.shape[-2:] == (16, 16)
            assert y4.shape[-2:] == (8, 8)
    r18 = build_dilated_resnet("resnet18")
    assert r18.layer3[1].conv1.dilation == (4, 4) and r18.layer3[0].conv1.stride == (1, 1)


def test_tau_start_skips_support():
    torch.manual_seed(0)
    enc = Encoder("resnet18").eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        full = enc(x)
        part = enc(x, tau_start=2)
        none = enc(x, tau_start=3)
    assert part["tau"].shape == (1,)
    torch.testing.assert_close(part["tau"], full["tau"][2:])
    assert none["tau"].shape == (0,)


def test_layer4_for_every_image_as_a_feature_path():
    torch.manual_seed(0)
    enc = Encoder("resnet18").eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        plain = enc(x, tau_start=2)
        both = enc(x, tau_start=2, layer4=True)
        all_l4 = enc.backbone.layer4(plain["hidden"][2])
    assert "layer4" not in plain and both["layer4"].shape == (3, enc.layer4_channels, 8, 8)
    torch.testing.assert_close(both["layer4"], all_l4)
    torch.testing.assert_close(both["tau"], plain["tau"])  # tau still only for x[tau_start:]
    torch.testing.assert_close(both["features"], plain["features"])


def test_random_init_warns_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Encoder("resnet18", weights_path=None)
        Encoder("resnet18", weights_path="")
    msgs = [w for w in caught if "randomly initialised" in str(w.message)]
    assert len(msgs) == 2  # one per construction


def _backbone_equal(enc, reference_state, prefix):
    own = enc.backbone.state_dict()
    n = 0
    for key, value in reference_state.items():
        if key.startswith(prefix) and key[len(prefix):] in own:
            torch.testing.assert_close(own[key[len(prefix):]], value)
            n += 1
    return n


def test_load_coco_deeplab_layout(tmp_path, caplog):
    torch.manual_seed(1)
    ref = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None).state_dict()
    path = tmp_path / "deeplab.pth"
    torch.save(ref, path)
    with caplog.at_level(logging.INFO, logger="models.encoder"):
        enc = Encoder("resnet50", weights_path=path)
    n_backbone = sum(k.startswith("backbone.") for k in ref)
    assert enc.weights_loaded == n_backbone
    assert _backbone_equal(enc, ref, "backbone.") == n_backbone
    assert f"loaded {n_backbone} tensors" in caplog.text


def test_load_imagenet_layout(tmp_path):
    torch.manual_seed(2)
    ref = torchvision.models.resnet50(weights=None).state_dict()
    path = tmp_path / "resnet50.pth"
    torch.save({"state_dict": ref}, path)  # wrapped checkpoints are unwrapped too
    enc = Encoder("resnet50", weights_path=path)
    assert enc.weights_loaded == len(ref)  # incl. fc and BatchNorm buffers
    assert _backbone_equal(enc, ref, "") == len(ref)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        Encoder("resnet18", weights_path=path)


def test_no_matching_keys_is_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(3), "classifier.0.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="no tensor matches"):
        Encoder("resnet18", weights_path=path)


def test_shape_mismatch_is_error(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_backbone_weights(build_dilated_resnet("resnet50"), path)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_dilated_resnet("vgg16")


def test_partial_weights_file_is_refused_with_counts(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    counted = [k for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    path = tmp_path / "partial.pth"
    torch.save({k: state[k] for k in counted[:2]}, path)  # 2 of the backbone's tensors
    with pytest.raises(ValueError, match=rf"only 2 of the backbone's {len(counted)} tensors .*min_loaded_fraction=0.9"):
        Encoder("resnet18", weights_path=path)
    # the override loads it anyway
    assert Encoder("resnet18", weights_path=path, min_loaded_fraction=0).weights_loaded == 2
    # a file without the batch counters (older ImageNet releases) is complete
    path_no_counters = tmp_path / "no_counters.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path_no_counters)
    assert Encoder("resnet18", weights_path=path_no_counters).weights_loaded == len(counted) + 2  # + fc


def test_text_file_as_weights_names_the_problem(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_text("not weights\n")
    with pytest.raises(ValueError, match=r"weights.pth: not a PyTorch checkpoint"):
        Encoder("resnet18", weights_path=path)
