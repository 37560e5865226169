"""Episode augmentations: identity, exact shifts, one warp for image and mask, seeded reproducibility."""
import numpy as np

from dataloaders.transforms import AugmentParams, augment_pair, gamma_transform, geometric_transform

IDENTITY = AugmentParams(gamma_range=(1.0, 1.0), rotation_deg=0.0, shift_px=0.0, shear_deg=0.0,
                         scale_range=(1.0, 1.0), elastic_alpha=0.0, elastic_sigma=5.0)


class FixedDraws:
    """Stands in for a numpy Generator: ``uniform`` returns the given values in order, ``random`` 0.5
    (zero elastic noise after the 2 * u - 1 mapping)."""

    def __init__(self, *values):
        self.values = list(values)

    def uniform(self, low, high, size=None):
        if size is None:
            return self.values.pop(0)
        return np.array([self.values.pop(0) for _ in range(size)])

    def random(self, size, dtype=np.float64):
        return np.full(size, 0.5, dtype=dtype)


def slice_and_mask(h=12, w=16):
    image = np.arange(h * w, dtype=np.float32).reshape(h, w)
    mask = np.zeros((h, w), np.float32)
    mask[3:8, 4:11] = 1
    return image, mask


def test_identity_parameters_give_the_identity():
    image, mask = slice_and_mask()
    out_img, out_mask = geometric_transform(image, mask, np.random.default_rng(0), IDENTITY)
    np.testing.assert_array_equal(out_img, image)
    np.testing.assert_array_equal(out_mask, mask)
    img, msk = augment_pair(image, mask, np.random.default_rng(0), IDENTITY)  # gamma 1 as well
    np.testing.assert_allclose(img, image, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(msk, mask)
    np.testing.assert_allclose(gamma_transform(image, np.random.default_rng(0), (1.0, 1.0)), image, atol=1e-3)


def test_a_pure_integer_shift_is_exact():
    image, mask = slice_and_mask()
    # draws: rotation 0, shift (tx, ty) = (2, -1) px, shear 0, scale 1
    params = AugmentParams(rotation_deg=5.0, shift_px=5.0, shear_deg=5.0, scale_range=(0.9, 1.2), elastic_alpha=10.0)
    out_img, out_mask = geometric_transform(image, mask, FixedDraws(0.0, 2.0, -1.0, 0.0, 1.0), params)
    # content moves 2 px right and 1 px up: out[y, x] = in[y + 1, x - 2] where that pixel exists
    np.testing.assert_array_equal(out_img[:-1, 2:], image[1:, :-2])
    np.testing.assert_array_equal(out_mask[:-1, 2:], mask[1:, :-2])
    assert out_mask.sum() == mask.sum()


def test_image_and_mask_get_the_same_warp():
    _, mask = slice_and_mask()
    out_img, out_mask = geometric_transform(mask.copy(), mask, np.random.default_rng(3))
    # the image is the mask itself: the warped mask must be the warped image thresholded at 0.5
    np.testing.assert_array_equal(out_mask, (out_img >= 0.5).astype(np.float32))
    assert not np.array_equal(out_mask, mask)  # the warp did something


def test_same_seed_same_output():
    image, mask = slice_and_mask()
    a = augment_pair(image, mask, np.random.default_rng(11))
    b = augment_pair(image, mask, np.random.default_rng(11))
    c = augment_pair(image, mask, np.random.default_rng(12))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
