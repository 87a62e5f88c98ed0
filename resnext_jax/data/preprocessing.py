"""Per-image decoding and augmentation with PIL and numpy: the paper's ImageNet recipe and CIFAR's.

Every function takes one image (encoded bytes, a file path or a uint8 array) and returns a
float32 HWC array, normalized per channel. Randomness comes from a numpy Generator that the
caller derives from (seed, step, row), so an image's augmentation does not depend on which
process or thread computes it. Both entry points refuse an image too thin to resize with
bounded memory (`check_shape`) and scale 16-bit grayscale to 8 bits instead of clipping it.

ImageNet training (`random_resized_crop`), as in fb.resnet.torch, whose code the paper's
authors built on: a crop of 8%-100% of the image area with aspect ratio 3/4-4/3 resized to
`image_size`, brightness, contrast and saturation jitter of 0.4 in random order, PCA lighting
noise of std 0.1, per-channel normalization, horizontal flip. Evaluation: the shorter side
resized to `eval_image_size / eval_crop_fraction` (256 for 224), the central square crop.

The tools of modern recipes, off by default, draw from the same generator after the rest:
RandAugment (resnext_jax/data/randaugment.py) on the cropped, flipped PIL image, before
the color chain; random erasing (random_erasing.py) on the normalized float image, last.
"""

import dataclasses
import io
import math
import os

import numpy as np
import PIL.Image
import PIL.ImageStat

from resnext_jax.data import randaugment, random_erasing

# Statistics of ImageNet training images on a [0, 1] scale, from fb.resnet.torch
# (datasets/imagenet.lua: "Computed from random subset of ImageNet training images"); the same
# mean and std are torchvision's.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# AlexNet-style PCA lighting noise: eigenvalues and eigenvectors (columns) of the RGB pixel
# covariance of ImageNet, from the same file (`pca.eigval`, `pca.eigvec`).
IMAGENET_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
IMAGENET_EIGVEC = np.array(
    [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]],
    np.float32,
)
# CIFAR per-channel statistics of the training sets on a 0-255 scale, from fb.resnet.torch's
# datasets/cifar10.lua and the ResNeXt authors' datasets/cifar100.lua ("Computed from entire
# CIFAR-10/100 training set").
CIFAR10_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
CIFAR10_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
CIFAR100_MEAN = tuple(v / 255 for v in (129.3, 124.1, 112.4))
CIFAR100_STD = tuple(v / 255 for v in (68.2, 65.4, 70.4))
# ITU-R 601 luma, the grayscale of fb.resnet.torch's saturation and contrast jitter.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)

# Grayscale of more than 8 bits as PIL opens it (PNG, TIFF). "I" (32-bit) is how older
# Pillows open 16-bit PNGs, so its values are taken as 16-bit too.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# A photograph, panoramas included, is rarely wider than 1:10. Beyond 1:100 an image is a
# line, a barcode or a corrupt header, and resizing its shorter side to 256 for evaluation
# would make the other side over 25,600 pixels; this limit caps what one image costs in
# memory (a 256 x 25,600 RGB intermediate, 20 MB) however extreme the file.
MAX_ASPECT = 100
# The first bytes of what macOS writes as ._NAME beside NAME on a foreign disk.
APPLE_DOUBLE_MAGIC = b"\x00\x05\x16\x07"

IMAGE_AUGMENTATIONS = ("random_resized_crop", "pad_crop_flip", "flip", "none")
INTERPOLATIONS = {"bicubic": PIL.Image.Resampling.BICUBIC,
                  "bilinear": PIL.Image.Resampling.BILINEAR}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """What happens to each image; built from `config.dataset` by the data source."""

    image_size: int = 224
    channels: int = 3
    augment: str = "random_resized_crop"  # one of IMAGE_AUGMENTATIONS
    crop_area_range: tuple = (0.08, 1.0)  # random_resized_crop: fraction of the image area
    crop_aspect_range: tuple = (3 / 4, 4 / 3)  # random_resized_crop: width / height
    flip: bool = True  # random_resized_crop: flip half of the images horizontally
    crop_padding: int = 4  # pad_crop_flip
    color_jitter: float = 0.4  # brightness, contrast and saturation factors in 1 +- this
    lighting: float = 0.1  # std of the PCA lighting noise (3 channels only)
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    interpolation: str = "bicubic"
    eval_image_size: int = 0  # 0: image_size
    eval_crop_fraction: float = 0.875  # random_resized_crop: eval crop / resized shorter side
    jpeg_draft: bool = True  # let the JPEG decoder downscale by 2, 4 or 8 when a crop allows
    rand_augment: randaugment.RandAugment = randaugment.RandAugment()  # n = 0: off
    erase_probability: float = 0.0  # random erasing of one box; 0: off

    def __post_init__(self):
        if not self.eval_image_size:
            object.__setattr__(self, "eval_image_size", self.image_size)
        if self.augment not in IMAGE_AUGMENTATIONS:
            raise ValueError(f"augment={self.augment!r}; choose one of {IMAGE_AUGMENTATIONS}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation={self.interpolation!r}; choose one of {tuple(INTERPOLATIONS)}"
            )
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean={self.mean} and std={self.std} need one value per channel ({self.channels})"
            )
        random_erasing.check(self.erase_probability)
        lo, hi = self.crop_area_range
        a_lo, a_hi = self.crop_aspect_range
        if not (0 < lo <= hi <= 1 and 0 < a_lo <= a_hi):
            raise ValueError(
                f"crop_area_range={self.crop_area_range} must lie in (0, 1] and "
                f"crop_aspect_range={self.crop_aspect_range} be positive, low before high"
            )

    @property
    def eval_resize(self) -> int:
        """The shorter side before the central eval crop."""
        if self.augment != "random_resized_crop":
            return self.eval_image_size
        return round(self.eval_image_size / self.eval_crop_fraction)


def open_image(item, channels=3) -> PIL.Image.Image:
    """A lazily decoded PIL image from encoded bytes, a path or a uint8 HWC/HW array."""
    if isinstance(item, np.ndarray):
        return PIL.Image.fromarray(item[..., 0] if item.ndim == 3 and item.shape[-1] == 1 else item)
    try:
        return PIL.Image.open(item if isinstance(item, (str, os.PathLike)) else io.BytesIO(item))
    except PIL.UnidentifiedImageError as e:
        raise PIL.UnidentifiedImageError(f"not an image: {_what_file(item)}") from e


def _what_file(item) -> str:
    """What a file PIL cannot identify holds, as far as its first bytes tell."""
    if isinstance(item, (str, os.PathLike)):
        with open(item, "rb") as f:
            size, head = os.fstat(f.fileno()).st_size, f.read(8)
    else:
        size, head = len(item), bytes(item[:8])
    if size == 0:
        return "an empty file"
    if head.startswith(APPLE_DOUBLE_MAGIC):
        return "a macOS AppleDouble file (a resource fork, not the image)"
    return f"{size} bytes in no format PIL reads, beginning {head!r}"


class ImageShapeError(ValueError):
    """An image too thin to resize with bounded memory (see MAX_ASPECT)."""


def check_shape(image):
    """Raise ImageShapeError for an empty image or one of aspect ratio beyond 1:MAX_ASPECT."""
    width, height = image.size
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageShapeError(
            f"{width}x{height} pixels: aspect ratio beyond 1:{MAX_ASPECT}, the most training takes"
        )


def _to_mode(image, channels):
    mode = "RGB" if channels == 3 else "L"
    if image.mode in HIGH_BIT_DEPTH_MODES:
        # PIL's convert clips these at 255 instead of scaling them; 0-65535 onto 0-255 by
        # v / 257, which takes the 16-bit copy of an 8-bit image (u * 257) back to u.
        pixels = np.asarray(image).astype(np.float32) / 257
        image = PIL.Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return image if image.mode == mode else image.convert(mode)


def sample_crop_box(rng, width, height, area_range=(0.08, 1.0), aspect_range=(3 / 4, 4 / 3)):
    """A random (left, top, right, bottom) box, in float pixels, of the Inception crop.

    Area uniform in `area_range` (fractions of the image area), aspect ratio (width / height)
    log-uniform in `aspect_range`; 10 tries for a box that fits, else the largest central box
    whose aspect ratio is in range. fb.resnet.torch draws its ratio uniformly and applies it
    to both sides (w = sqrt(A) r, h = sqrt(A) / r), so its crops span r^2; we keep the range
    as configured, as Inception and torchvision do.
    """
    area = width * height
    log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
    for _ in range(10):
        target = area * rng.uniform(*area_range)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if w <= width and h <= height:
            left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return left, top, left + w, top + h
    aspect = min(max(width / height, aspect_range[0]), aspect_range[1])
    w, h = min(width, height * aspect), min(height, width / aspect)
    left, top = (width - w) / 2, (height - h) / 2
    return left, top, left + w, top + h


def _draft(image, box, out_size, enabled):
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale where `box` still covers `out_size` pixels.

    Returns the box in the coordinates of the image as it will be decoded.
    """
    if not enabled or image.format != "JPEG":
        return box
    width, height = image.size
    shrink = min(box[2] - box[0], box[3] - box[1]) / out_size
    scale = next((s for s in (8, 4, 2) if shrink >= s), 1)
    if scale == 1:
        return box
    drafted = image.draft(image.mode if image.mode in ("RGB", "L") else None,
                          (width // scale, height // scale))  # fmt: skip
    if drafted is None:
        return box
    factor = drafted[1][2] / width  # the decoded width over the original width
    return tuple(v * factor for v in box)


class ColorTransform:
    """Color jitter, lighting noise and normalization folded into one affine map per image.

    fb.resnet.torch applies brightness (x -> a x), contrast (x -> a x + (1 - a) mean(gray x))
    and saturation (x -> a x + (1 - a) gray x) in random order, then adds the lighting offset,
    then normalizes, never clipping in between. Each step is affine in RGB, so the whole chain
    is x -> x @ matrix + offset: one pass over the pixels instead of five.
    """

    def __init__(self, channels):
        self.matrix = np.eye(channels, dtype=np.float64)  # row vectors: x @ matrix
        self.offset = np.zeros(channels, np.float64)
        self.channels = channels

    def blend(self, alpha, target_matrix, target_offset):
        """x -> alpha x + (1 - alpha) target(x), target(x) = x @ target_matrix + target_offset."""
        self.matrix = alpha * self.matrix + (1 - alpha) * self.matrix @ target_matrix
        self.offset = alpha * self.offset + (1 - alpha) * (self.offset @ target_matrix
                                                           + target_offset)  # fmt: skip

    def jitter(self, rng, strength, mean_pixel):
        """Brightness, contrast, saturation in random order, each factor in 1 +- strength."""
        # x @ gray puts the luma of x in every channel.
        gray = np.repeat(LUMA[:, None], 3, axis=1) if self.channels == 3 else np.ones((1, 1))
        zero = np.zeros(self.channels)
        for op in rng.permutation(3):
            alpha = 1 + rng.uniform(-strength, strength)
            if op == 0:  # brightness: blend with black
                self.blend(alpha, np.zeros_like(self.matrix), zero)
            elif op == 1:  # contrast: blend with the mean gray of the current image
                current = mean_pixel @ self.matrix + self.offset
                level = float(current @ LUMA) if self.channels == 3 else float(current[0])
                self.blend(alpha, np.zeros_like(self.matrix), np.full(self.channels, level))
            elif self.channels == 3:  # saturation: blend with the image's own gray
                self.blend(alpha, gray, zero)

    def light(self, rng, std):
        """Add eigvec @ (alpha * eigval), alpha ~ N(0, std), to every pixel (RGB only)."""
        if self.channels == 3:
            alpha = rng.normal(0, std, 3)
            self.offset = self.offset + IMAGENET_EIGVEC @ (alpha * IMAGENET_EIGVAL)

    def normalize(self, mean, std):
        std = np.asarray(std, np.float64)
        self.matrix = self.matrix / std
        self.offset = (self.offset - np.asarray(mean)) / std

    def apply(self, pixels: np.ndarray, out=None) -> np.ndarray:
        """`pixels` uint8 HWC (0-255) -> float32 HWC."""
        flat = pixels.reshape(-1, self.channels).astype(np.float32)
        if out is None:
            out = np.empty(pixels.shape, np.float32)
        np.matmul(flat, (self.matrix / 255).astype(np.float32), out=out.reshape(flat.shape))
        out += self.offset.astype(np.float32)
        return out


def _mean_pixel(image) -> np.ndarray:
    return np.asarray(PIL.ImageStat.Stat(image).mean, np.float64) / 255


def _color(p: Preprocess, image, rng, out):
    """Jitter (when training), normalize and write the PIL image into `out` as float32."""
    color = ColorTransform(p.channels)
    if rng is not None and p.color_jitter > 0:
        color.jitter(rng, p.color_jitter, _mean_pixel(image))
    if rng is not None and p.lighting > 0:
        color.light(rng, p.lighting)
    color.normalize(p.mean, p.std)
    pixels = np.asarray(image)
    return color.apply(pixels[..., None] if pixels.ndim == 2 else pixels, out)


def train_image(item, rng, p: Preprocess, out=None) -> np.ndarray:
    """One augmented training image, float32 (image_size, image_size, channels)."""
    image = open_image(item, p.channels)
    check_shape(image)
    size = p.image_size
    if p.augment == "random_resized_crop":
        box = sample_crop_box(rng, *image.size, p.crop_area_range, p.crop_aspect_range)
        box = _draft(image, box, size, p.jpeg_draft)
        image = _to_mode(image, p.channels)
        image = image.resize((size, size), INTERPOLATIONS[p.interpolation], box=box)
        flip = p.flip and rng.random() < 0.5
    else:
        image = _resize_center_crop(_to_mode(image, p.channels), size, size, p.interpolation)
        flip = p.augment != "none" and rng.random() < 0.5
        if p.augment == "pad_crop_flip":
            image = _pad_crop(image, p.crop_padding, rng)
    if flip:
        image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    if p.rand_augment.n:
        fill = randaugment.fill_color(p.mean)
        image = p.rand_augment(image, rng, fill, p.interpolation)
    out = _color(p, image, rng, out)
    return random_erasing.erase(out, rng, p.erase_probability)


def eval_image(item, p: Preprocess, out=None) -> np.ndarray:
    """One evaluation image: shorter side resized, central crop; deterministic."""
    image = open_image(item, p.channels)
    check_shape(image)
    image = _to_mode(image, p.channels)
    image = _resize_center_crop(image, p.eval_resize, p.eval_image_size, p.interpolation)
    return _color(p, image, None, out)


def _resize_center_crop(image, shorter, crop, interpolation):
    """Resize the shorter side to `shorter`, then take the central crop x crop.

    The same pixels as torchvision's `Resize(shorter)` + `CenterCrop(crop)` on a PIL image
    (its long side truncated, its crop offset rounded), so that published weights score here
    what torchvision reports for them.
    """
    width, height = image.size
    if (width, height) == (crop, crop):
        return image
    if width <= height:
        size = (shorter, int(shorter * height / width))
    else:
        size = (int(shorter * width / height), shorter)
    if size != (width, height):
        image = image.resize(size, INTERPOLATIONS[interpolation])
    if min(size) < crop:  # torchvision pads a too-small image with zeros; scale it up instead
        return image.resize((crop, crop), INTERPOLATIONS[interpolation])
    left, top = round((size[0] - crop) / 2), round((size[1] - crop) / 2)
    return image.crop((left, top, left + crop, top + crop))


def _pad_crop(image, pad, rng):
    """Zero-pad by `pad` on each side, then a random crop of the original size."""
    if pad <= 0:
        return image
    dx, dy = rng.integers(0, 2 * pad + 1, size=2)
    width, height = image.size
    # PIL fills the part of a crop box outside the image with zeros.
    return image.crop((dx - pad, dy - pad, dx - pad + width, dy - pad + height))
