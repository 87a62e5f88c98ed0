"""Per-image preprocessing: the Inception crop's bounds, the folded color chain, eval crops."""

import io

import numpy as np
import PIL.Image
import pytest

from resnext_jax.data import preprocessing as pp
from tests.fake_data import encode_image


def jpeg(width, height, seed=0, quality=90, mode="RGB"):
    """Encoded JPEG bytes of a smooth random image."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), np.uint8)
    image = PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BICUBIC)
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(500, 375), (300, 300), (200, 480)])
def test_crop_boxes_stay_within_the_configured_area_and_aspect(size):
    width, height = size
    rng = np.random.default_rng(0)
    for area_range, aspect_range in (((0.08, 1.0), (3 / 4, 4 / 3)), ((0.3, 0.5), (1.0, 1.5))):
        boxes = np.array([pp.sample_crop_box(rng, width, height, area_range, aspect_range)
                          for _ in range(2000)])  # fmt: skip
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width + 1e-9).all()
        assert (boxes[:, 3] <= height + 1e-9).all()
        area, aspect = w * h / (width * height), w / h
        assert (aspect >= aspect_range[0] - 1e-9).all() and (aspect <= aspect_range[1] + 1e-9).all()
        assert (area <= area_range[1] + 1e-9).all()
        fits = area >= area_range[0] - 1e-9  # the rest are the fallback's central boxes
        assert fits.mean() > 0.9
        if size == (300, 300) and area_range == (0.08, 1.0):
            # Area uniform over the range (less the draws that do not fit), aspect log-uniform.
            assert area.min() < 0.1 and area.max() > 0.95 and 0.45 < np.median(area) < 0.6
            assert abs(np.mean(np.log(aspect))) < 0.02
            assert aspect.min() < 0.76 and aspect.max() > 1.32


def test_fallback_box_is_central_and_in_range():
    class Never:  # a generator whose boxes never fit: full area, extreme aspect
        def uniform(self, lo, hi):
            return hi

    left, top, right, bottom = pp.sample_crop_box(Never(), 400, 100)
    assert (right - left) / (bottom - top) == pytest.approx(4 / 3)
    assert bottom - top == 100 and left == pytest.approx(400 - right)


def test_train_image_shapes_dtypes_and_ranges():
    p = pp.Preprocess(image_size=64, color_jitter=0, lighting=0, mean=(0,) * 3, std=(1,) * 3)
    out = pp.train_image(jpeg(200, 150), np.random.default_rng(0), p)
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    assert out.min() >= -0.01 and out.max() <= 1.01  # bicubic overshoot is clipped to uint8
    full = pp.Preprocess(image_size=64)  # the paper's recipe: jitter, lighting, normalization
    outs = np.stack([pp.train_image(jpeg(200, 150), np.random.default_rng(s), full)
                     for s in range(8)])  # fmt: skip
    # Jitter does not clip (fb.resnet.torch's neither): pixel values may leave [0, 1] a little.
    pixels = outs * pp.IMAGENET_STD + pp.IMAGENET_MEAN
    assert np.isfinite(outs).all() and -1 < pixels.min() and pixels.max() < 2.5
    assert abs(pixels.mean() - 0.5) < 0.25
    assert len({o.tobytes() for o in outs}) == 8  # each seed its own augmentation
    again = pp.train_image(jpeg(200, 150), np.random.default_rng(3), full)
    np.testing.assert_array_equal(again, outs[3])  # a function of the generator's seed


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpegs_come_out_rgb(mode):
    p = pp.Preprocess(image_size=32)
    assert pp.train_image(jpeg(80, 60, mode=mode), np.random.default_rng(0), p).shape == (32, 32, 3)
    assert pp.eval_image(jpeg(80, 60, mode=mode), p).shape == (32, 32, 3)


def test_eval_resizes_the_shorter_side_and_crops_the_center():
    data = jpeg(512, 384)
    p = pp.Preprocess(image_size=224, eval_image_size=224, eval_crop_fraction=0.875,
                      mean=(0,) * 3, std=(1,) * 3)  # fmt: skip
    out = pp.eval_image(data, p)
    np.testing.assert_array_equal(out, pp.eval_image(data, p))  # deterministic
    # Reference: resize to 341x256 (shorter side 224 / 0.875), then the central 224 square.
    resized = PIL.Image.open(io.BytesIO(data)).resize((341, 256), PIL.Image.BICUBIC)
    reference = np.asarray(resized.crop((58, 16, 282, 240)), np.float32) / 255
    np.testing.assert_allclose(out, reference, atol=1e-6)
    table5 = pp.Preprocess(eval_image_size=320, eval_crop_fraction=1.0)
    assert table5.eval_resize == 320 and pp.eval_image(data, table5).shape == (320, 320, 3)


SHAPES = [(500, 375), (333, 500), (281, 500), (640, 480), (90, 120)]


@pytest.mark.parametrize("width,height", SHAPES)
def test_eval_pixels_are_torchvisions(width, height):
    """Published weights see what they saw in torchvision's evaluation (Resize + CenterCrop)."""
    transforms = pytest.importorskip("torchvision.transforms")
    data = jpeg(width, height, seed=width)
    p = pp.Preprocess(interpolation="bilinear")
    reference = transforms.Compose([
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision docs
    ])(PIL.Image.open(io.BytesIO(data)).convert("RGB"))  # fmt: skip
    np.testing.assert_allclose(pp.eval_image(data, p), reference.permute(1, 2, 0), atol=1e-5)


def test_color_transform_matches_the_steps_it_folds():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 7, 3)).astype(np.uint8)
    x = pixels.astype(np.float64) / 255
    color = pp.ColorTransform(3)
    color.jitter(np.random.default_rng(1), 0.4, x.reshape(-1, 3).mean(0))
    color.light(np.random.default_rng(2), 0.1)
    color.normalize(pp.IMAGENET_MEAN, pp.IMAGENET_STD)
    # The same steps one after another, as fb.resnet.torch's transforms.lua does them.
    draws = np.random.default_rng(1)
    luma = lambda img: (img @ pp.LUMA.astype(np.float64))[..., None]  # noqa: E731
    for op in draws.permutation(3):
        alpha = 1 + draws.uniform(-0.4, 0.4)
        if op == 0:
            x = alpha * x
        elif op == 1:
            x = alpha * x + (1 - alpha) * luma(x).mean()
        else:
            x = alpha * x + (1 - alpha) * luma(x)
    light = np.random.default_rng(2).normal(0, 0.1, 3)
    x = x + pp.IMAGENET_EIGVEC.astype(np.float64) @ (light * pp.IMAGENET_EIGVAL)
    x = (x - pp.IMAGENET_MEAN) / pp.IMAGENET_STD
    np.testing.assert_allclose(color.apply(pixels), x, rtol=1e-5, atol=1e-5)


def test_pad_crop_flip_keeps_size_and_shifts_by_at_most_the_padding():
    rng = np.random.default_rng(0)
    pixels = rng.integers(1, 256, (32, 32, 3)).astype(np.uint8)
    p = pp.Preprocess(image_size=32, augment="pad_crop_flip", color_jitter=0, lighting=0,
                      mean=(0,) * 3, std=(1 / 255,) * 3)  # fmt: skip
    outs = [pp.train_image(pixels, np.random.default_rng(s), p) for s in range(40)]
    flipped = 0
    for out in outs:
        assert out.shape == (32, 32, 3)
        found = False
        for candidate, was_flipped in ((out, False), (out[:, ::-1], True)):
            padded = np.pad(pixels, ((4, 4), (4, 4), (0, 0))).astype(np.float32)
            for dy in range(9):
                for dx in range(9):
                    if np.array_equal(padded[dy : dy + 32, dx : dx + 32], candidate):
                        found, flipped = True, flipped + was_flipped
        assert found
    assert 5 < flipped < 35
    same = pp.Preprocess(image_size=32, augment="none", mean=(0,) * 3, std=(1 / 255,) * 3)
    np.testing.assert_array_equal(pp.eval_image(pixels, same), pixels)


def test_jpeg_draft_decodes_a_large_crop_at_reduced_scale():
    data = jpeg(1600, 1200, seed=3)
    image = PIL.Image.open(io.BytesIO(data))
    box = pp._draft(image, (100, 100, 1100, 1000), 224, enabled=True)
    assert image.size == (400, 300)  # 1/4: a 900-pixel side still covers 224 twice over
    assert box == pytest.approx((25, 25, 275, 250))
    rng = lambda: np.random.default_rng(5)  # noqa: E731
    fast, exact = (pp.Preprocess(image_size=224, jpeg_draft=d, color_jitter=0, lighting=0)
                   for d in (True, False))  # fmt: skip
    a, b = pp.train_image(data, rng(), fast), pp.train_image(data, rng(), exact)
    assert np.abs(a - b).mean() < 0.05  # in std units: the same crop, decoded at another scale


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="choose one of"):
        pp.Preprocess(augment="cutout")
    with pytest.raises(ValueError, match="one value per channel"):
        pp.Preprocess(mean=(0.5,))
    with pytest.raises(ValueError, match="crop_area_range"):
        pp.Preprocess(crop_area_range=(0.5, 0.1))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_grayscale_decodes_as_its_8_bit_version(mode):
    rng = np.random.default_rng(0)
    eight = np.tile(np.arange(256, dtype=np.uint8), (256, 1))  # a gradient over every level
    # The 16-bit copy, with noise in the low byte that the 8-bit one rounds away.
    sixteen = np.clip(eight.astype(np.int64) * 257 + rng.integers(-128, 128, eight.shape), 0, 65535)
    if mode == "I;16":  # what a 16-bit PNG opens as
        data = encode_image(sixteen.astype(np.uint16), "PNG")
    elif mode == "I;16B":
        data = encode_image(PIL.Image.frombytes(mode, (256, 256), sixteen.astype(">u2").tobytes()),
                            "TIFF")  # fmt: skip
    else:
        data = encode_image(sixteen.astype(np.int32), "TIFF")
    assert PIL.Image.open(io.BytesIO(data)).mode == mode
    p = pp.Preprocess(image_size=256, augment="none", mean=(0,) * 3, std=(1 / 255,) * 3)
    reference = pp.eval_image(np.repeat(eight[..., None], 3, -1), p)  # 0-255, unresized
    np.testing.assert_array_equal(reference[0, :, 1], np.arange(256))
    np.testing.assert_allclose(pp.eval_image(data, p), reference, atol=1.0 + 1e-4)


class ResizeLimit:
    """PIL's resize, refused (before it allocates) beyond `pixels` output pixels."""

    def __init__(self, monkeypatch, pixels):
        self.largest = 0
        original = PIL.Image.Image.resize

        def resize(image, size, *args, **kwargs):
            self.largest = max(self.largest, size[0] * size[1])
            assert size[0] * size[1] <= pixels, f"a resize to {size}"
            return original(image, size, *args, **kwargs)

        monkeypatch.setattr(PIL.Image.Image, "resize", resize)


@pytest.mark.parametrize("augment", pp.IMAGE_AUGMENTATIONS)
@pytest.mark.parametrize("shape", [(20000, 1), (1, 20000), (2, 300), (2, 150)])
def test_thin_images_are_refused_and_the_rest_resize_within_bounds(shape, augment, monkeypatch):
    p = pp.Preprocess(image_size=224, augment=augment)
    # The shorter side at eval_resize (256), the longer at most MAX_ASPECT times that.
    limit = ResizeLimit(monkeypatch, pixels=256 * 256 * pp.MAX_ASPECT)
    data = encode_image(np.full(shape, 100, np.uint8), "PNG")
    images = [lambda: pp.eval_image(data, p),
              lambda: pp.train_image(data, np.random.default_rng(0), p)]  # fmt: skip
    if max(shape) > pp.MAX_ASPECT * min(shape):  # 1:20000 and 1:150
        for image in images:
            with pytest.raises(pp.ImageShapeError, match=r"aspect ratio beyond 1:100"):
                image()
        assert limit.largest == 0  # refused from the header, before decoding
    else:  # 1:75 trains and evaluates, within the bound
        for image in images:
            assert image().shape == (224, 224, 3)
        assert limit.largest > 0
