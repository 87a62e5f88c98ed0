"""Random erasing (Zhong et al. 2020) as timm's `RandomErasing(mode="pixel")`, one box.

With probability p a training image, already normalized, gets one box of its pixels replaced
by standard normal noise, drawn per pixel and channel (noise in the normalized space, like
timm, which erases after normalizing). The box covers a fraction of the image area uniform in
AREA_RANGE, with a height / width ratio log-uniform in ASPECT_RANGE, its sides rounded to
whole pixels; timm's 10 tries for a box strictly smaller than the image, else no box. The
draws come from the caller's numpy Generator, and none is made when p = 0.
"""

import math

import numpy as np

AREA_RANGE = (0.02, 1 / 3)  # fraction of the image area (timm's min_area, max_area)
ASPECT_RANGE = (0.3, 1 / 0.3)  # box height / width (timm's min_aspect and its inverse)
TRIES = 10


def check(probability) -> float:
    """`probability` if it is in [0, 1]; else a ValueError that says what to set."""
    if not 0 <= probability <= 1:
        raise ValueError(
            f"random_erasing={probability!r} must be a probability in [0, 1] "
            "(0: off; DeiT uses 0.25)"
        )
    return float(probability)


def sample_box(rng, height, width):
    """A random (top, left, box height, box width), or None after TRIES boxes that do not fit."""
    log_lo, log_hi = math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])
    for _ in range(TRIES):
        area = rng.uniform(*AREA_RANGE) * height * width
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if h < height and w < width:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


def erase(image, rng, probability):
    """With `probability`, one random box of `image` (float HWC, normalized) replaced by
    standard normal noise, in place. Returns `image`."""
    if probability <= 0 or rng.random() >= probability:
        return image
    box = sample_box(rng, *image.shape[:2])
    if box is not None:
        top, left, h, w = box
        noise = rng.standard_normal((h, w, image.shape[2]), dtype=np.float32)
        image[top : top + h, left : left + w] = noise
    return image
