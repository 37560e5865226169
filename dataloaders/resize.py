"""Running the model at a smaller square size than the data (config key ``image_size``).

Training episodes and EP1 inputs are resized to ``size x size`` before the model sees them; EP1
probabilities are resized back to the label grid before thresholding, so every score is computed on the
data's own grid. Images and masks use bilinear interpolation with antialiasing (an area-like average when
shrinking); masks are then cut at 0.5 so they stay binary.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

EPISODE_IMAGE_KEYS = ("support_images", "query_images")
EPISODE_MASK_KEYS = ("support_masks", "query_masks")


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of the last two axes of a float tensor [..., H, W] -> [..., h, w]."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:]).float()
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    return out.reshape(*lead, *size)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images [..., H, W] -> float32 [..., size, size]."""
    return _resize(images, (size, size))


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Binary masks [..., H, W] -> [..., size, size] in {0, 1}, same dtype as the input."""
    if tuple(masks.shape[-2:]) == (size, size):
        return masks
    return (_resize(masks.float(), (size, size)) >= 0.5).to(masks.dtype)


def resize_probabilities(probs: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Probabilities [..., h, w] back to the label grid [..., H, W] (bilinear, no antialiasing)."""
    return _resize(probs, tuple(shape)).clamp_(0.0, 1.0)


def resize_episode(episode: dict[str, Any], size: int) -> dict[str, Any]:
    """An episode dict (see ``dataloaders.episodes``) with images and masks at ``size x size``."""
    out = dict(episode)
    for key in EPISODE_IMAGE_KEYS:
        out[key] = resize_images(episode[key], size)
    for key in EPISODE_MASK_KEYS:
        out[key] = resize_masks(episode[key], size)
    return out


class ResizedEpisodes(Dataset):
    """Wraps an episode data set so that every episode comes out at ``size x size``.

    The resizing runs in the DataLoader workers, after augmentation at the data's own size.
    """

    def __init__(self, episodes: Dataset, size: int):
        self.episodes, self.size = episodes, int(size)

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return resize_episode(self.episodes[index], self.size)
