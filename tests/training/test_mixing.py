"""Mixup and CutMix of the global batch: the draws, the mixed rows, and the same result on one
device and on four."""

import os
import pathlib
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax.training import mixing

ROOT = str(pathlib.Path(__file__).resolve().parents[2])
MIXUP = dict(mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5)
CUTMIX = dict(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)
BOTH = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)


def _batch(rows=6, size=8, classes=5):
    images = jax.random.normal(jax.random.key(1), (rows, size, size, 3))
    labels = jnp.arange(rows) % classes
    targets = jax.nn.one_hot(labels, classes) * 0.9 + 0.1 / classes  # label-smoothed
    return images, targets


def _cutmix_key(height, width):
    """A step key whose CutMix box is neither empty nor the whole image."""
    for step in range(100):
        key = jax.random.fold_in(jax.random.key(0), step)
        d = mixing.draw(key, height, width, **CUTMIX)
        if 0 < d.lam < 1:
            return key, d
    raise AssertionError("no step drew a proper box")


def test_mixup_blends_each_row_with_its_mirror_row_by_the_drawn_lam():
    images, targets = _batch()
    key = jax.random.key(3)
    d = mixing.draw(key, 8, 8, **MIXUP)
    lam = np.float32(d.lam)
    assert 0 < lam < 1 and not d.cutmix and np.all(np.asarray(d.box) == 0)
    got_images, got_targets = mixing.mix(images, targets, key, **MIXUP)
    x, t = np.asarray(images), np.asarray(targets)
    np.testing.assert_array_equal(got_images, lam * x + (1 - lam) * x[::-1])
    np.testing.assert_array_equal(got_targets, lam * t + (1 - lam) * t[::-1])


def test_cutmix_pastes_a_box_of_the_mirror_row_and_weights_targets_by_its_area():
    images, targets = _batch(rows=4, size=16)
    key, d = _cutmix_key(16, 16)
    assert d.cutmix
    top, bottom, left, right = (int(v) for v in d.box)
    got_images, got_targets = mixing.mix(images, targets, key, **CUTMIX)
    x, t = np.asarray(images), np.asarray(targets)
    want = x.copy()
    want[:, top:bottom, left:right] = x[::-1, top:bottom, left:right]
    np.testing.assert_array_equal(got_images, want)
    area = (bottom - top) * (right - left) / (16 * 16)
    assert float(d.lam) == pytest.approx(1 - area, abs=1e-7)
    lam = np.float32(d.lam)
    np.testing.assert_array_equal(got_targets, lam * t + (1 - lam) * t[::-1])


def test_cutmix_box_follows_timm_rand_bbox():
    """Sides int(sqrt(1 - lam) * size), made even, around a center that may clip the box."""
    widths = []
    for step in range(200):
        key = jax.random.fold_in(jax.random.key(0), step)
        d = mixing.draw(key, 10, 20, **CUTMIX)
        top, bottom, left, right = (int(v) for v in d.box)
        assert 0 <= top <= bottom <= 10 and 0 <= left <= right <= 20
        height, width = bottom - top, right - left
        if 0 < top and bottom < 10 and 0 < left and right < 20:  # not clipped: both sides
            assert height % 2 == 0 and width % 2 == 0  # are 2 * (int(ratio * size) // 2)
            assert abs(width - 2 * height) <= 2
        widths.append(width)
    assert max(widths) > 10 and min(widths) < 4


def test_switch_prob_and_prob_set_how_often_each_mix_is_drawn():
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(0), s))(jnp.arange(2000))

    def draws(**kwargs):
        return jax.vmap(lambda k: mixing.draw(k, 8, 8, **kwargs))(keys)

    half = draws(**dict(BOTH, prob=0.5, switch_prob=0.25))
    mixed = np.asarray(half.cutmix) | (np.asarray(half.lam) < 1)
    assert 0.45 < mixed.mean() < 0.55
    assert 0.2 < np.asarray(half.cutmix)[mixed].mean() < 0.3
    assert not draws(**dict(BOTH, switch_prob=0.0)).cutmix.any()
    assert draws(**dict(BOTH, switch_prob=1.0)).cutmix.all()
    # Beta(0.8, 0.8) is symmetric about 1/2.
    assert abs(float(draws(**MIXUP).lam.mean()) - 0.5) < 0.02


def test_prob_zero_leaves_the_batch_unchanged():
    images, targets = _batch()
    images = images.at[0, 0, 0, 0].set(jnp.inf)  # no inf * 0 leaks into the partner row
    for kind in (MIXUP, CUTMIX, BOTH):
        got_images, got_targets = mixing.mix(
            images, targets, jax.random.key(5), **dict(kind, prob=0.0)
        )
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_targets, targets)


def test_both_alphas_zero_return_the_inputs_themselves():
    images, targets = _batch()
    off = dict(mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5)
    got = mixing.mix(images, targets, jax.random.key(0), **off)
    assert got[0] is images and got[1] is targets


def test_bad_settings_are_errors_that_name_them():
    images, targets = _batch()
    with pytest.raises(ValueError, match="mixup_alpha=-1"):
        mixing.mix(images, targets, jax.random.key(0), **dict(MIXUP, mixup_alpha=-1))
    with pytest.raises(ValueError, match="switch_prob=2"):
        mixing.mix(images, targets, jax.random.key(0), **dict(BOTH, switch_prob=2))


def test_different_steps_draw_different_mixes():
    lams = [
        float(mixing.draw(jax.random.fold_in(jax.random.key(0), step), 8, 8, **BOTH).lam)
        for step in range(8)
    ]
    assert len(set(lams)) == len(lams)


def test_mix_under_jit_matches_eager_and_keeps_the_dtype():
    """CutMix copies pixels: exact. Mixup's blend is one rounding apart, XLA fusing
    lam * x + (1 - lam) * p into a fused multiply-add."""
    images, targets = _batch()
    key, _ = _cutmix_key(8, 8)
    for kind in (CUTMIX, MIXUP):
        jitted = jax.jit(partial(mixing.mix, **kind))(images, targets, key)
        eager = mixing.mix(images, targets, key, **kind)
        for got, want in zip(jitted, eager, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
            if kind is CUTMIX and got.ndim == 4:
                np.testing.assert_array_equal(got, want)
    half = images.astype(jnp.bfloat16)
    mixed, _ = jax.jit(partial(mixing.mix, **MIXUP))(half, targets, jax.random.key(2))
    assert mixed.dtype == jnp.bfloat16
    assert not np.array_equal(np.asarray(mixed, np.float32), np.asarray(half, np.float32))


_ON_FOUR_DEVICES = """
import jax, jax.numpy as jnp, numpy as np
from functools import partial
from jax.sharding import PartitionSpec as P
from resnext_jax.devices import parallel
from resnext_jax.training import mixing
assert jax.device_count() == 4
images = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
targets = jax.nn.one_hot(jnp.arange(8) % 5, 5) * 0.9 + 0.02
kinds = [dict(mixup_alpha=0.8, cutmix_alpha=0.0), dict(mixup_alpha=0.0, cutmix_alpha=1.0),
         dict(mixup_alpha=0.8, cutmix_alpha=1.0)]
seen = set()
for kind in kinds:
    fn = partial(mixing.mix, **kind, prob=0.9, switch_prob=0.5)
    one = jax.jit(fn)
    four = parallel.per_device(partial(fn, axis_name=parallel.DATA_AXIS), parallel.make_mesh(),
                               in_specs=(P("data"), P("data"), P()),
                               out_specs=(P("data"), P("data")))
    draw = jax.jit(partial(mixing.draw, height=16, width=16, **kind, prob=0.9, switch_prob=0.5))
    for step in range(6):
        key = jax.random.fold_in(jax.random.key(0), step)
        for g, w in zip(four(images, targets, key), one(images, targets, key)):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        d = draw(key)
        seen.add("cutmix" if d.cutmix else "mixup" if d.lam < 1 else "none")
    ops = parallel.collective_ops(four.lower(images, targets, key).compile())
    assert {op for op, _ in ops} == {"collective-permute"}, ops
    assert sorted(s for _, shapes in ops for s in shapes) == [(2, 5), (2, 16, 16, 3)], ops
print(sorted(seen))
"""


@pytest.mark.slow
def test_four_devices_mix_the_global_batch_bit_for_bit_as_one_does():
    """Each device's rows mixed with their global partners; only the partner rows move."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", _ON_FOUR_DEVICES],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["['cutmix',", "'mixup',", "'none']"]
