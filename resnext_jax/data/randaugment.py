"""RandAugment (Cubuk et al. 2020) as timm runs it in "ResNet strikes back": `rand-mM-mstdS-inc1`.

Each training image gets `n` ops drawn uniformly, with replacement, from OPS (timm's
`_RAND_INCREASING_TRANSFORMS`, whose ops grow stronger with the magnitude), each applied with
probability 0.5. An applied op takes the magnitude `m` (0-10), plus Gaussian noise of std
`mstd` drawn per op (`inf`: uniform in [0, m]), clipped to [0, 10]; with level = magnitude / 10:

| op | argument |
|---|---|
| AutoContrast, Equalize, Invert | none |
| Rotate | +-30 level degrees about the center |
| PosterizeIncreasing | keep 4 - int(4 level) bits (0 at m = 10: a black image) |
| SolarizeIncreasing | invert pixels >= 256 - int(256 level) |
| SolarizeAdd | add int(110 level) to pixels < 128, capped at 255 |
| Color-, Contrast-, Brightness-, SharpnessIncreasing | enhance by max(0.1, 1 +- 0.9 level) |
| ShearX, ShearY | affine shear +-0.3 level |
| TranslateXRel, TranslateYRel | shift by +-0.45 level of the width (height) |

"+-" is a sign drawn per op, as timm's `_randomly_negate`. Geometric ops resample with the
pipeline's interpolation and fill what enters the frame with the dataset's mean pixel (the
normalization mean on 0-255, as timm's `create_transform` passes `img_mean`), which
normalizes to 0. Grayscale images take every op; Color leaves them unchanged (PIL's).
The draws come from the caller's numpy Generator, so an image's ops depend only on its seed.
"""

import dataclasses
import math

import numpy as np
import PIL.Image
import PIL.ImageEnhance
import PIL.ImageOps

from resnext_jax.data.base import DataError

MAX_MAGNITUDE = 10.0  # timm's scale (`_LEVEL_DENOM`): m = 10 is each op's strongest setting
OP_PROBABILITY = 0.5  # timm's for RandAugment
RESAMPLE = {"nearest": PIL.Image.Resampling.NEAREST, "bilinear": PIL.Image.Resampling.BILINEAR,
            "bicubic": PIL.Image.Resampling.BICUBIC}  # fmt: skip


def _signed(value, rng):
    return -value if rng.random() < 0.5 else value


def _lut(image, table):
    """`image` through one 256-entry table on every band."""
    return image.point(list(table) * len(image.getbands()))


def _affine(image, matrix, fill, resample):
    return image.transform(image.size, PIL.Image.Transform.AFFINE, matrix, resample=resample,
                           fillcolor=fill)  # fmt: skip


def _enhance(enhancer):
    def op(image, level, rng, fill, resample):
        return enhancer(image).enhance(max(0.1, 1 + _signed(0.9 * level, rng)))

    return op


def _posterize(image, level, rng, fill, resample):
    # A table rather than ImageOps.posterize, which refuses 0 bits since Pillow 10.
    bits = 4 - int(level * 4)
    mask = 256 - 2 ** (8 - bits)
    return _lut(image, (i & mask for i in range(256)))


def _solarize_add(image, level, rng, fill, resample):
    add = int(level * 110)
    return _lut(image, (min(255, i + add) if i < 128 else i for i in range(256)))


# name -> op(image, level in [0, 1], rng, fill, resample); timm's order.
OPS = {
    "AutoContrast": lambda image, *_: PIL.ImageOps.autocontrast(image),
    "Equalize": lambda image, *_: PIL.ImageOps.equalize(image),
    "Invert": lambda image, *_: PIL.ImageOps.invert(image),
    "Rotate": lambda image, level, rng, fill, resample: image.rotate(
        _signed(30 * level, rng), resample=resample, fillcolor=fill
    ),
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": lambda image, level, *_: PIL.ImageOps.solarize(
        image, 256 - int(level * 256)
    ),
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhance(PIL.ImageEnhance.Color),
    "ContrastIncreasing": _enhance(PIL.ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(PIL.ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(PIL.ImageEnhance.Sharpness),
    "ShearX": lambda image, level, rng, fill, resample: _affine(
        image, (1, _signed(0.3 * level, rng), 0, 0, 1, 0), fill, resample
    ),
    "ShearY": lambda image, level, rng, fill, resample: _affine(
        image, (1, 0, 0, _signed(0.3 * level, rng), 1, 0), fill, resample
    ),
    "TranslateXRel": lambda image, level, rng, fill, resample: _affine(
        image, (1, 0, _signed(0.45 * level, rng) * image.width, 0, 1, 0), fill, resample
    ),
    "TranslateYRel": lambda image, level, rng, fill, resample: _affine(
        image, (1, 0, 0, 0, 1, _signed(0.45 * level, rng) * image.height), fill, resample
    ),
}


def fill_color(mean) -> tuple:
    """The fill of geometric ops: a per-channel mean on [0, 1] as 0-255 pixel values."""
    return tuple(min(255, round(255 * float(v))) for v in mean)


def apply_op(name, image, magnitude, rng, fill=(128,), resample="bilinear") -> PIL.Image.Image:
    """Op `name` of OPS at `magnitude` (0-10) on a PIL image (mode L or RGB), always applied."""
    fill = fill[0] if image.mode == "L" else tuple(fill) * (3 // len(fill))
    return OPS[name](image, magnitude / MAX_MAGNITUDE, rng, fill, RESAMPLE[resample])


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """`n` ops per image at magnitude `m` with noise `mstd` (config.dataset.randaugment_*)."""

    n: int = 0  # 0: off
    m: float = 9.0
    mstd: float = 0.0

    def __post_init__(self):
        bad = []
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or self.n < 0:
            bad.append(f"randaugment_n={self.n!r} must be an integer >= 0 (0: off; RSB uses 2)")
        if not 0 <= self.m <= MAX_MAGNITUDE:
            bad.append(
                f"randaugment_m={self.m!r} must be in [0, {MAX_MAGNITUDE:g}], timm's magnitude "
                "scale (RSB uses 6 or 7, RandAugment's ImageNet setting 9)"
            )
        if not self.mstd >= 0:  # NaN fails too
            bad.append(
                f"randaugment_mstd={self.mstd!r} must be >= 0 (0: a fixed magnitude; inf: "
                "uniform in [0, m]; RSB uses 0.5)"
            )
        if bad:
            raise ValueError("; ".join(bad))

    def magnitude(self, rng) -> float:
        """One op's magnitude: m, with noise if mstd > 0, clipped to [0, 10]."""
        if self.mstd == math.inf:
            magnitude = rng.uniform(0, self.m)
        elif self.mstd > 0:
            magnitude = rng.normal(self.m, self.mstd)
        else:
            magnitude = self.m
        return min(max(float(magnitude), 0.0), MAX_MAGNITUDE)

    def __call__(self, image, rng, fill=(128,), resample="bilinear"):
        """`image` (uint8 HWC or HW array, or a PIL image in mode L or RGB) after `n` random
        ops, of the same kind and shape; unchanged when n = 0."""
        if not self.n:
            return image
        array = isinstance(image, np.ndarray)
        pil = image
        if array:
            pil = PIL.Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1
                                      else image)  # fmt: skip
        names = list(OPS)
        for choice in rng.integers(len(names), size=self.n):
            if rng.random() < OP_PROBABILITY:
                pil = apply_op(names[choice], pil, self.magnitude(rng), rng, fill, resample)
        return np.asarray(pil).reshape(image.shape) if array else pil


def from_config(ds) -> RandAugment:
    """The RandAugment of a `config.dataset` block (configs without the fields: off)."""
    try:
        return RandAugment(ds.get("randaugment_n", 0), ds.get("randaugment_m", 9.0),
                           ds.get("randaugment_mstd", 0.0))  # fmt: skip
    except ValueError as e:
        raise DataError(f"config.dataset: {e}. Set them with --config.dataset.FIELD=VALUE") from e
