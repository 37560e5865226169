"""image_size: episodes and EP1 inputs at a smaller size, predictions back on the label grid."""
from __future__ import annotations


import numpy as np
import pytest
import torch

import training
from conftest import SYNTH_TEST_SIZE, smoke_updates
from config import ConfigError, build_config, resolve_config
from dataloaders.dataset_specifics import get_dataset_spec
from dataloaders.resize import resize_episode, resize_images, resize_masks, resize_probabilities
from dataloaders.volume_io import load_case
from evaluation.ep1_fold import predict_query
from models.fewshot import FewShotSeg



def test_same_size_is_the_identity():
    x = torch.rand(2, 3, 8, 8)
    assert resize_images(x, 8) is x
    m = (torch.rand(8, 8) > 0.5).float()
    assert resize_masks(m, 8) is m


def test_halving_uses_the_antialiasing_triangle_filter():
    # shrinking x2 widens the bilinear triangle to a half-width of 2 input pixels: output pixel 0 (centre
    # at input coordinate 1.0) weighs input pixels 0, 1, 2 by 0.75, 0.75, 0.25 (normalised by 1.75)
    x = torch.tensor([1.0, 1.0, 2.0, 2.0]).repeat(4, 1)
    expected = torch.tensor([8 / 7, 13 / 7]).repeat(2, 1)
    torch.testing.assert_close(resize_images(x, 2), expected)
    torch.testing.assert_close(resize_images(torch.full((6, 6), 3.0), 4), torch.full((4, 4), 3.0))


def test_masks_stay_binary_and_keep_their_dtype():
    m = torch.zeros(1, 16, 16, dtype=torch.int64)
    m[0, 4:12, 4:12] = 1
    small = resize_masks(m, 8)
    assert small.dtype == torch.int64 and set(small.unique().tolist()) == {0, 1}
    assert small[0, 2:6, 2:6].all() and small.sum() == 16  # the 8 x 8 square becomes 4 x 4


def test_probabilities_come_back_on_the_label_grid():
    p = torch.rand(3, 10, 10)
    back = resize_probabilities(p, (25, 25))
    assert back.shape == (3, 25, 25) and back.min() >= 0 and back.max() <= 1


def test_episode_resize_touches_images_and_masks_only():
    episode = {"support_images": torch.rand(1, 3, 16, 16), "support_masks": torch.ones(1, 16, 16),
               "query_images": torch.rand(1, 3, 16, 16), "query_masks": torch.ones(1, 16, 16, dtype=torch.int64),
               "case_id": torch.tensor(3)}
    out = resize_episode(episode, 8)
    assert out["support_images"].shape == (1, 3, 8, 8) and out["query_masks"].shape == (1, 8, 8)
    assert out["query_masks"].dtype == torch.int64 and out["case_id"] is episode["case_id"]


def test_image_size_is_validated():
    base = build_config(["smoke"])
    with pytest.raises(ConfigError, match="'image_size'"):
        resolve_config(dict(base, image_size=8), need_data=False)


def test_training_episodes_come_at_image_size(synth_root, tmp_path):
    cfg = resolve_config(build_config(["smoke"], smoke_updates(synth_root, tmp_path, image_size=32)))
    episode = training.build_episodes(cfg)[0]
    assert episode["support_images"].shape[-2:] == (32, 32)
    assert episode["query_masks"].shape[-2:] == (32, 32)


def test_evaluation_at_the_data_size_is_unchanged_and_a_smaller_size_scores_on_the_label_grid(synth_root, tmp_path):
    cfg = resolve_config(build_config(["smoke"], smoke_updates(synth_root, tmp_path, n_steps=1)))
    final = training.train(cfg)
    spec = get_dataset_spec("SYNTH")
    case_ids = [1, 2]
    support, query = (load_case(cfg["data_dir"], i, spec, n_sv=None, load_label=True) for i in case_ids)
    model = FewShotSeg.from_config(dict(cfg["model"], weights_path=""))
    model.load_state_dict(torch.load(final, weights_only=False)["model"])
    model.eval()
    cpu = torch.device("cpu")
    args = (model, support, query, 1, 3, 4, cpu, "off")
    plain = predict_query(*args)
    same = predict_query(*args, image_size=SYNTH_TEST_SIZE)
    np.testing.assert_array_equal(plain["prob"], same["prob"])
    small = predict_query(*args, image_size=32)
    assert small["prob"].shape == plain["prob"].shape == small["target"].shape
    assert small["prob"].shape[-2:] == (SYNTH_TEST_SIZE, SYNTH_TEST_SIZE)
    assert not np.array_equal(small["prob"], plain["prob"])
