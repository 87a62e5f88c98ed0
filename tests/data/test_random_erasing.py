"""Random erasing: one box of 2%-33% of the area, aspect 0.3-3.3, of standard normal noise."""

import numpy as np
import pytest

from resnext_jax.data import random_erasing as erasing


def erased_box(before, after):
    """(top, left, height, width) of the pixels that changed, checked to be one full box."""
    changed = (before != after).any(-1)
    rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
    top, left, h, w = rows[0], cols[0], rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert changed[top : top + h, left : left + w].all() and changed.sum() == h * w
    return top, left, h, w


def test_probability_zero_is_the_identity_and_draws_nothing():
    image = np.random.default_rng(0).normal(size=(16, 16, 3)).astype(np.float32)
    rng = np.random.default_rng(1)
    out = erasing.erase(image.copy(), rng, 0.0)
    np.testing.assert_array_equal(out, image)
    assert rng.random() == np.random.default_rng(1).random()


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 24, 3)])
def test_probability_one_erases_exactly_one_box_within_the_bounds(shape):
    height, width, _ = shape
    areas, aspects = [], []
    for seed in range(300):
        image = np.full(shape, 5.0, np.float32)  # 5: not a value the noise takes
        out = erasing.erase(image.copy(), np.random.default_rng(seed), 1.0)
        assert out.shape == shape and out.dtype == np.float32
        if np.array_equal(out, image):  # 10 boxes in a row too large: timm's no box
            continue
        _, _, h, w = erased_box(image, out)
        assert h < height and w < width
        areas.append(h * w / (height * width))
        aspects.append(h / w)
    assert len(areas) > 285
    # Sides are rounded to whole pixels, so area and aspect may pass the bounds by a rounding.
    assert min(areas) > 0.02 * 0.6 and max(areas) < 1 / 3 * 1.3
    assert min(aspects) > 0.3 * 0.6 and max(aspects) < 1 / 0.3 / 0.6
    assert np.median(areas) == pytest.approx((0.02 + 1 / 3) / 2, rel=0.2)  # uniform area
    assert abs(np.median(np.log(aspects))) < 0.2  # log-uniform aspect, centered on 1


def test_sampled_boxes_fit_and_follow_the_ranges():
    rng = np.random.default_rng(0)
    boxes = [erasing.sample_box(rng, 40, 60) for _ in range(3000)]
    boxes = np.array([b for b in boxes if b is not None])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (top + h <= 40).all() and (left >= 0).all()
    assert (left + w <= 60).all() and (h < 40).all() and (w < 60).all()
    area = h * w / 2400
    assert area.min() < 0.03 and area.max() > 0.3 and area.max() < 0.36
    aspect = h / w
    assert aspect.min() < 0.35 and aspect.max() > 2.9


def test_the_box_is_per_pixel_standard_normal_noise():
    noise = []
    for seed in range(50):
        image = np.full((64, 64, 3), 5.0, np.float32)
        out = erasing.erase(image.copy(), np.random.default_rng(seed), 1.0)
        noise.append(out[out != 5.0])
        box = out[(out != 5.0).any(-1)]
        assert len(np.unique(box[:, 0])) > 0.99 * len(box)  # per pixel, not one color a box
        assert not np.array_equal(box[:, 0], box[:, 1])  # per channel
    noise = np.concatenate(noise)
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02


def test_probability_is_the_share_of_erased_images():
    image = np.zeros((20, 20, 1), np.float32)
    erased = [
        not np.array_equal(erasing.erase(image.copy(), np.random.default_rng(s), 0.25), image)
        for s in range(2000)
    ]
    assert 0.21 < np.mean(erased) < 0.27


def test_the_same_generator_seed_erases_the_same_box():
    image = np.zeros((20, 20, 3), np.float32)
    a = erasing.erase(image.copy(), np.random.default_rng(7), 1.0)
    b = erasing.erase(image.copy(), np.random.default_rng(7), 1.0)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_probability_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"random_erasing=.* must be a probability in \[0, 1\]"):
        erasing.check(bad)
