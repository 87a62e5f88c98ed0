"""Mixup and CutMix of the global batch, on device, the same on any number of devices.

The semantics of timm's `Mixup` in "batch" mode (timm/data/mixup.py): one draw per step for
the whole global batch of B rows; row i is mixed with row B-1-i, its partner (timm mixes the
batch with its flip). With probability `prob` the batch is mixed at all; with both alphas
above 0, CutMix with probability `switch_prob`, else Mixup; with one above 0, that one.

- Mixup: lam ~ Beta(alpha, alpha); each image is lam * itself + (1 - lam) * its partner.
- CutMix: lam ~ Beta(alpha, alpha); a box of sides int(sqrt(1 - lam) * H) and
  int(sqrt(1 - lam) * W) (each made even), its center uniform over the pixels, clipped at
  the border, is pasted from the partner; lam is then 1 - the box's share of the image
  (timm's `rand_bbox` and `correct_lam`).

The targets become lam * own + (1 - lam) * the partner's. Every draw comes from the key
alone, the same on every device, so each device mixes its rows as one device would the
whole batch: bit for bit (tests/training/test_mixing.py).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from resnext_jax.devices import parallel


class Draw(NamedTuple):
    """One step's mixing, the same for every row of the global batch."""

    lam: jax.Array  # float32: a row's own share of its targets; 1 when not mixed
    cutmix: jax.Array  # bool: a box is pasted (else a Mixup blend by lam, or nothing)
    # int32 (top, bottom, left, right): rows [top, bottom) and columns [left, right) come
    # from the partner; all 0 unless `cutmix`.
    box: jax.Array


def draw(key, height, width, *, mixup_alpha, cutmix_alpha, prob, switch_prob) -> Draw:
    """The step's mixing of `height` x `width` images, drawn from `key` alone."""
    _check(mixup_alpha, cutmix_alpha, prob, switch_prob)
    k_apply, k_switch, k_mixup, k_cutmix, k_y, k_x = jax.random.split(key, 6)
    applied = jax.random.uniform(k_apply) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        cutmix = jnp.asarray(cutmix_alpha > 0)
    # Only the enabled Betas are drawn: Beta(0, 0) is no distribution.
    mixup_lam = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
    cutmix_lam = jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
    cutmix = applied & cutmix

    ratio = jnp.sqrt(1 - jnp.clip(cutmix_lam, 0.0, 1.0))
    half_h = jnp.floor(height * ratio).astype(jnp.int32) // 2
    half_w = jnp.floor(width * ratio).astype(jnp.int32) // 2
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    box = jnp.stack([
        jnp.clip(cy - half_h, 0, height), jnp.clip(cy + half_h, 0, height),
        jnp.clip(cx - half_w, 0, width), jnp.clip(cx + half_w, 0, width),
    ])  # fmt: skip
    box = jnp.where(cutmix, box, 0)
    area = (box[1] - box[0]) * (box[3] - box[2])
    box_lam = 1 - area.astype(jnp.float32) / (height * width)
    lam = jnp.where(cutmix, box_lam, jnp.where(applied, mixup_lam, 1.0))
    return Draw(lam.astype(jnp.float32), cutmix, box.astype(jnp.int32))


def partner(x, axis_name=None):
    """Each row's partner: global row B-1-i for row i of the batch's B rows.

    Inside shard_map over `axis_name`, device d holds global rows d*b .. d*b+b-1, whose
    partners are device D-1-d's rows reversed: one permute between devices, no gather.
    `x` may be a tree of arrays with the same rows.
    """
    devices = parallel.axis_devices(axis_name)
    if devices > 1:
        x = jax.lax.ppermute(x, axis_name, [(d, devices - 1 - d) for d in range(devices)])
    return jax.tree.map(lambda a: a[::-1], x)


def mix(images, targets, key, *, mixup_alpha, cutmix_alpha, prob, switch_prob, axis_name=None):
    """The batch's images (NHWC) and (rows, classes) targets, mixed as `draw` says.

    `key` must be the same on every device. With `axis_name`, `images` and `targets` are this
    device's rows of the global batch, in global order. The images keep their dtype. With
    both alphas 0, the inputs come back unchanged.
    """
    if mixup_alpha == 0 and cutmix_alpha == 0:
        _check(mixup_alpha, cutmix_alpha, prob, switch_prob)
        return images, targets
    _, height, width, _ = images.shape
    d = draw(key, height, width, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
             prob=prob, switch_prob=switch_prob)  # fmt: skip
    other_images, other_targets = partner((images, targets), axis_name)
    own = _own_share(d, height, width)[None, :, :, None]
    mixed = _blend(images, other_images, own)
    return mixed, _blend(targets, other_targets, d.lam)


def _own_share(d: Draw, height, width):
    """(height, width) float32: each pixel's share from the row's own image."""
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    top, bottom, left, right = d.box
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return jnp.where(d.cutmix, jnp.where(inside, 0.0, 1.0), jnp.full((height, width), d.lam))


def _blend(x, other, own):
    """own * x + (1 - own) * other, in x's dtype; exactly x where own is 1, other where 0."""
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    mixed = own * x.astype(dtype) + (1 - own) * other.astype(dtype)
    # Exact copies where one side has all the weight, whatever the other holds (inf, NaN).
    mixed = jnp.where(own == 1, x.astype(dtype), jnp.where(own == 0, other.astype(dtype), mixed))
    return mixed.astype(x.dtype)


def _check(mixup_alpha, cutmix_alpha, prob, switch_prob):
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(
            f"mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}: an alpha is 0 (off) or "
            "above 0 (the Beta distribution's parameter)"
        )
    for name, value in (("prob", prob), ("switch_prob", switch_prob)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name}={value} is a probability: give a value in [0, 1]")
