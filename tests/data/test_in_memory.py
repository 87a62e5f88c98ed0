"""In-memory sources: deterministic, resumable training order; eval covers each example once."""

import itertools

import jax
import numpy as np
import pytest

from resnext_jax.data import base, in_memory


def _source(n_train=50, n_eval=23):
    return in_memory.synthetic(4, 1, 5, n_train, n_eval, seed=0)


def test_train_order_is_a_function_of_seed_and_step():
    source = _source()
    it = source.train_batches(8, seed=3)
    first = [next(it)["label"] for _ in range(12)]  # crosses an epoch (6 steps each)
    resumed = source.train_batches(8, seed=3, start_step=7)
    for step in range(7, 12):
        np.testing.assert_array_equal(next(resumed)["label"], first[step])
    other_seed = next(source.train_batches(8, seed=4))["label"]
    assert not np.array_equal(other_seed, first[0])


def test_each_epoch_is_a_permutation():
    source = _source(n_train=48)
    it = source.train_batches(8, seed=0)
    images = np.concatenate([next(it)["image"] for _ in range(6)])
    order = images.reshape(48, -1)[:, 0]
    expected = np.sort(source._normalize(source.train_images).reshape(48, -1)[:, 0])
    np.testing.assert_array_equal(np.sort(order), expected)


def test_eval_covers_every_example_once_with_a_masked_remainder():
    source = _source(n_eval=23)
    batches = list(source.eval_batches(8))
    assert len(batches) == 3
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.sum() == 23 and masks[:23].all() and not masks[23:].any()
    labels = np.concatenate([b["label"] for b in batches])[:23]
    np.testing.assert_array_equal(labels, source.eval_labels)


def test_pad_crop_flip_keeps_shape_and_pixels():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 255, (16, 6, 6, 1)).astype(np.uint8)
    out = in_memory.pad_crop_flip(images, np.random.default_rng(1), pad=2)
    assert out.shape == images.shape and out.dtype == np.uint8
    for original, augmented in zip(images, out, strict=True):
        inside = augmented[augmented > 0]  # padding is zero; real pixels are 1..254
        assert set(inside.tolist()) <= set(original.ravel().tolist())
    assert not np.array_equal(out, images)


def test_flip_mirrors_about_half_and_keeps_the_rest():
    images = np.arange(64 * 3 * 4).reshape(64, 3, 4, 1).astype(np.uint8)
    out = in_memory.flip(images, np.random.default_rng(0))
    mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images, strict=True)]
    kept = [np.array_equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True))
    assert 20 < sum(mirrored) < 44


def test_augment_is_checked():
    import pytest

    data = (np.zeros((4, 2, 2, 1), np.uint8), np.zeros(4, np.int32))
    with pytest.raises(base.DataError, match="choose one of"):
        in_memory.InMemorySource(data, data, 2, augment="cutout")


def test_prefetch_passes_errors_through():
    def broken():
        yield 1
        raise ValueError("bad record")

    it = base.prefetch(broken())
    assert next(it) == 1
    try:
        next(it)
    except ValueError as e:
        assert "bad record" in str(e)
    else:
        raise AssertionError("the error was lost")


@pytest.mark.parametrize("augment", ["flip", "pad_crop_flip"])
@pytest.mark.parametrize("processes", [2, 4])
def test_processes_hold_their_rows_of_the_one_process_batch(augment, processes, monkeypatch):
    """Rows, order and augmentation of a global batch do not depend on the process count."""
    source = _source(n_train=64)
    source.augment = augment
    whole = list(itertools.islice(source.train_batches(16, seed=1, start_step=3), 5))
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    parts = []
    for index in range(processes):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        it = source.train_batches(16, seed=1, start_step=3)
        parts.append(list(itertools.islice(it, 5)))
    for step, batch in enumerate(whole):
        for key in ("image", "label"):
            joined = np.concatenate([part[step][key] for part in parts])
            np.testing.assert_array_equal(joined, batch[key])
