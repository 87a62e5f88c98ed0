"""RandAugment: each op of timm's increasing set at its magnitude, on grayscale and RGB; the
choice of ops, their probability and magnitude noise; its checks."""

import math

import numpy as np
import PIL.Image
import pytest

from resnext_jax.data import base
from resnext_jax.data import randaugment as ra

GRAY_FILL, RGB_FILL = (73,), (10, 200, 30)


def smooth(channels, size=20, seed=0):
    """A smooth uint8 image of low contrast (pixels 60-180), HWC."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(60, 181, (4, 5, 3), np.uint8)
    image = PIL.Image.fromarray(coarse).resize((size, size), PIL.Image.BICUBIC)
    pixels = np.asarray(image)
    return pixels[..., :1].copy() if channels == 1 else pixels.copy()


def op(name, pixels, magnitude=10, seed=0, resample="nearest"):
    """Op `name` applied to a HWC uint8 array, back as HWC."""
    image = PIL.Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    fill = GRAY_FILL if pixels.shape[-1] == 1 else RGB_FILL
    out = ra.apply_op(name, image, magnitude, np.random.default_rng(seed), fill, resample)
    assert out.mode == image.mode and out.size == image.size
    return np.asarray(out).reshape(pixels.shape)


def both_signs(name, pixels, magnitude=10):
    """The op's outputs over seeds: one per sign it draws."""
    outs = {op(name, pixels, magnitude, seed).tobytes(): op(name, pixels, magnitude, seed)
            for seed in range(16)}  # fmt: skip
    return list(outs.values())


def test_the_ops_are_timms_increasing_set_in_its_order():
    assert list(ra.OPS) == [
        "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
        "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
        "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
        "TranslateYRel",
    ]  # fmt: skip


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", list(ra.OPS))
def test_each_op_changes_grayscale_and_rgb_images_keeping_shape_and_dtype(name, channels):
    pixels = smooth(channels)
    out = op(name, pixels, magnitude=7)
    assert out.shape == pixels.shape and out.dtype == np.uint8
    if name == "ColorIncreasing" and channels == 1:
        np.testing.assert_array_equal(out, pixels)  # no color to change (PIL's)
    else:
        assert (out != pixels).mean() > 0.05


@pytest.mark.parametrize("channels", [1, 3])
def test_pixel_ops_follow_timms_magnitude_mapping(channels):
    x = smooth(channels).astype(int)
    np.testing.assert_array_equal(op("Invert", smooth(channels)), 255 - x)
    stretched = op("AutoContrast", smooth(channels))
    assert stretched.min() <= 1 and stretched.max() >= 254  # about 60-180 before
    assert np.ptp(op("Equalize", smooth(channels))) > 200
    # PosterizeIncreasing keeps 4 - int(4 m / 10) bits: 4 at m = 0, 2 at m = 5, none at m = 10.
    for magnitude, mask in ((0, 0xF0), (5, 0xC0), (10, 0)):
        np.testing.assert_array_equal(op("PosterizeIncreasing", smooth(channels), magnitude),
                                      x & mask)  # fmt: skip
    # SolarizeIncreasing inverts pixels >= 256 - int(256 m / 10).
    for magnitude, threshold in ((0, 256), (5, 128), (10, 0)):
        np.testing.assert_array_equal(op("SolarizeIncreasing", smooth(channels), magnitude),
                                      np.where(x < threshold, x, 255 - x))  # fmt: skip
    # SolarizeAdd adds int(110 m / 10) below 128, capped at 255.
    for magnitude, add in ((3, 33), (10, 110)):
        np.testing.assert_array_equal(op("SolarizeAdd", smooth(channels), magnitude),
                                      np.where(x < 128, np.minimum(x + add, 255), x))  # fmt: skip


def test_brightness_factor_is_one_plus_or_minus_0_9_level_at_least_0_1():
    x = smooth(3).astype(float)
    for magnitude, factors in ((10, (0.1, 1.9)), (5, (0.55, 1.45))):
        outs = both_signs("BrightnessIncreasing", smooth(3), magnitude)
        assert len(outs) == 2
        found = sorted(float(np.median(o / x)) for o in outs)
        assert found == pytest.approx(factors, abs=0.02)
    assert op("BrightnessIncreasing", smooth(3), magnitude=0).tobytes() == smooth(3).tobytes()


def test_color_desaturates_or_saturates_rgb():
    pixels = smooth(3)
    spreads = sorted(
        np.ptp(o.astype(int), axis=-1).mean() for o in both_signs("ColorIncreasing", pixels)
    )
    assert spreads[0] < 0.2 * np.ptp(pixels.astype(int), axis=-1).mean() < spreads[1]


@pytest.mark.parametrize("channels", [1, 3])
def test_translate_shifts_by_0_45_level_of_the_side_and_fills_with_the_fill(channels):
    pixels = smooth(channels)  # 20 x 20: 9 pixels at m = 10
    fill = np.array(GRAY_FILL if channels == 1 else RGB_FILL)
    outs = both_signs("TranslateXRel", pixels)
    assert len(outs) == 2
    for out in outs:
        left = np.array_equal(out[:, :11], pixels[:, 9:]) and (out[:, 11:] == fill).all()
        right = np.array_equal(out[:, 9:], pixels[:, :11]) and (out[:, :9] == fill).all()
        assert left != right
    for out in both_signs("TranslateYRel", pixels):
        up = np.array_equal(out[:11], pixels[9:]) and (out[11:] == fill).all()
        down = np.array_equal(out[9:], pixels[:11]) and (out[:9] == fill).all()
        assert up != down


@pytest.mark.parametrize("channels", [1, 3])
def test_shears_move_pixels_along_one_axis_only(channels):
    fill = np.array(GRAY_FILL if channels == 1 else RGB_FILL)
    rows = np.broadcast_to(np.arange(100, 120, dtype=np.uint8)[:, None, None], (20, 20, channels))
    for out in both_signs("ShearX", np.ascontiguousarray(rows)):
        # Each row keeps its own value where it does not take the fill; the bottom rows
        # shift by up to 0.3 * 20 = 6 pixels, so they take some.
        is_fill = (out == fill).all(-1)
        np.testing.assert_array_equal(np.where(is_fill[..., None], rows, out), rows)
        assert 5 <= is_fill[-1].sum() <= 7 and not is_fill[0].any()
    cols = np.ascontiguousarray(rows.transpose(1, 0, 2))
    for out in both_signs("ShearY", cols):
        is_fill = (out == fill).all(-1)
        np.testing.assert_array_equal(np.where(is_fill[..., None], cols, out), cols)
        assert 5 <= is_fill[:, -1].sum() <= 7 and not is_fill[:, 0].any()


@pytest.mark.parametrize("channels", [1, 3])
def test_rotate_turns_30_level_degrees_about_the_center(channels):
    pixels = smooth(channels, size=21)
    fill = GRAY_FILL if channels == 1 else RGB_FILL
    outs = both_signs("Rotate", pixels)
    assert len(outs) == 2
    for out in outs:
        np.testing.assert_array_equal(out[10, 10], pixels[10, 10])
        for corner in (out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]):
            np.testing.assert_array_equal(corner, fill)
    image = PIL.Image.fromarray(pixels.squeeze())
    fill = fill[0] if channels == 1 else fill
    expected = {np.asarray(image.rotate(a, fillcolor=fill)).tobytes() for a in (15, -15)}
    assert {o.tobytes() for o in both_signs("Rotate", pixels, magnitude=5)} == expected


def test_sharpness_leaves_flat_images_alone():
    flat = np.full((10, 10, 3), 90, np.uint8)
    for out in both_signs("SharpnessIncreasing", flat):
        np.testing.assert_array_equal(out, flat)


def test_n_zero_is_the_identity_and_n_positive_changes_images_in_shape_dtype_and_range():
    images = [smooth(c, seed=s) for c in (1, 3) for s in range(20)]
    off = ra.RandAugment(0)
    for image in images:
        assert off(image, np.random.default_rng(0)) is image
    on = ra.RandAugment(2, 9, 0.5)
    changed = 0
    for i, image in enumerate(images):
        out = on(image, np.random.default_rng(i), GRAY_FILL if image.shape[-1] == 1 else RGB_FILL)
        assert out.shape == image.shape and out.dtype == np.uint8
        changed += not np.array_equal(out, image)
        again = on(image, np.random.default_rng(i), GRAY_FILL if image.shape[-1] == 1 else RGB_FILL)
        np.testing.assert_array_equal(out, again)  # a function of the generator's seed
    assert changed >= 25  # of 40; an image keeps its pixels when neither op fires (1/4)


def test_pil_images_in_pil_images_out():
    image = PIL.Image.fromarray(smooth(3))
    out = ra.RandAugment(3)(image, np.random.default_rng(0))
    assert isinstance(out, PIL.Image.Image) and out.size == image.size and out.mode == "RGB"


def test_ops_are_chosen_uniformly_with_replacement_and_fire_half_the_time(monkeypatch):
    calls = []
    for name in ra.OPS:
        monkeypatch.setitem(ra.OPS, name, lambda image, *a, name=name: calls.append(name) or image)
    augment, rng = ra.RandAugment(n=3), np.random.default_rng(0)
    for _ in range(2000):
        augment(PIL.Image.new("L", (4, 4)), rng)
    assert 2800 < len(calls) < 3200  # 6000 draws, each applied with probability 0.5
    counts = np.array([calls.count(name) for name in ra.OPS])
    assert counts.min() > 150 and counts.max() < 250  # 200 each


def test_magnitude_noise_is_gaussian_clipped_to_0_10_or_uniform_for_inf():
    rng = np.random.default_rng(0)
    assert ra.RandAugment(2, 7).magnitude(rng) == 7
    noisy = np.array([ra.RandAugment(2, 7, 0.5).magnitude(rng) for _ in range(4000)])
    assert abs(noisy.mean() - 7) < 0.03 and abs(noisy.std() - 0.5) < 0.03
    clipped = np.array([ra.RandAugment(2, 9.5, 2.0).magnitude(rng) for _ in range(4000)])
    assert clipped.max() == 10 and clipped.min() >= 0 and (clipped == 10).mean() > 0.3
    uniform = np.array([ra.RandAugment(2, 6, math.inf).magnitude(rng) for _ in range(4000)])
    assert uniform.min() >= 0 and uniform.max() <= 6 and abs(uniform.mean() - 3) < 0.1


def test_fill_is_the_mean_pixel():
    assert ra.fill_color((0.485, 0.456, 0.406)) == (124, 116, 104)
    assert ra.fill_color(np.array([0.2860], np.float32)) == (73,)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"randaugment_n": -1}, "randaugment_n=-1 must be an integer >= 0"),
        ({"randaugment_n": 1.5}, "randaugment_n=1.5 must be an integer"),
        ({"randaugment_m": 11.0}, r"randaugment_m=11.0 must be in \[0, 10\]"),
        ({"randaugment_m": -0.5}, r"randaugment_m=-0.5 must be in \[0, 10\]"),
        ({"randaugment_mstd": -1.0}, "randaugment_mstd=-1.0 must be >= 0"),
        ({"randaugment_mstd": math.nan}, "randaugment_mstd=nan must be >= 0"),
    ],
)
def test_bad_fields_are_named_with_what_to_set(fields, message):
    with pytest.raises(base.DataError, match=f"config.dataset: {message}.*--config.dataset"):
        ra.from_config(fields)


def test_configs_without_the_fields_turn_it_off():
    assert ra.from_config({}) == ra.RandAugment(0, 9.0, 0.0)
