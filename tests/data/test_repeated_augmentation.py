"""Repeated augmentation: B/k images per global batch, each k times, each copy augmented on its
own; the order a function of (seed, step) and the same on any number of processes."""

import itertools

import jax
import numpy as np
import pytest

from resnext_jax.data import base, image_source, in_memory, preprocessing, randaugment


def test_one_repeat_is_the_plain_epoch_order():
    for step in range(14):  # 6 steps an epoch: crosses two epochs
        epoch, index = divmod(step, 6)
        expected = base.epoch_permutation(3, epoch, 50)[index * 8 : (index + 1) * 8]
        np.testing.assert_array_equal(base.batch_ids(3, step, 50, 8), expected)
        np.testing.assert_array_equal(base.batch_ids(3, step, 50, 8, repeats=1), expected)


def test_each_image_k_times_a_batch_and_once_a_pass_of_k_epochs():
    n, batch, k = 48, 12, 3  # 4 steps an epoch; a pass over the 48 images takes 12 steps
    batches = [base.batch_ids(5, step, n, batch, repeats=k) for step in range(24)]
    for ids in batches:
        distinct = ids[: batch // k]
        assert len(set(distinct.tolist())) == batch // k
        np.testing.assert_array_equal(ids, np.tile(distinct, k))  # copies B/k rows apart
    for start in (0, 12):  # each pass a permutation: every image in it exactly k times
        counts = np.bincount(np.concatenate(batches[start : start + 12]), minlength=n)
        assert (counts == k).all()
    assert not np.array_equal(batches[0], batches[12])  # a new permutation each pass
    again = base.batch_ids(5, 7, n, batch, repeats=k)
    np.testing.assert_array_equal(again, batches[7])  # a function of (seed, step)
    assert not np.array_equal(base.batch_ids(6, 7, n, batch, repeats=k), batches[7])


@pytest.mark.parametrize("repeats", [0, -2, 2.5, True, "3"])
def test_repeats_must_be_an_integer_of_at_least_one(repeats):
    with pytest.raises(base.DataError, match="repeated_augmentation=.* must be an integer >= 1"):
        base.check_repeats(repeats)


def test_a_batch_k_does_not_divide_holds_the_last_images_one_copy_fewer():
    ids = base.batch_ids(0, 0, 50, 10, repeats=3)  # 4 images: 3, 3, 2, 2 copies
    assert len(ids) == 10 and sorted(np.unique(ids, return_counts=True)[1]) == [2, 2, 3, 3]
    np.testing.assert_array_equal(ids[4:8], ids[:4])
    with pytest.raises(base.DataError, match="do not fit in a batch of 2"):
        base.batch_ids(0, 0, 50, 2, repeats=3)
    source = in_memory.synthetic(4, 1, 5, 50, 10, repeats=3)
    assert next(source.train_batches(16, seed=0))["image"].shape[0] == 16


def _in_memory(**options):
    return in_memory.synthetic(6, 3, 5, 64, 16, seed=0, **options)


def test_in_memory_copies_hold_one_image_differently_augmented():
    plain = _in_memory(repeats=4)
    batch = next(plain.train_batches(16, seed=2, start_step=5))
    copies = batch["image"].reshape(4, 4, -1)
    for copy in copies[1:]:
        np.testing.assert_array_equal(copy, copies[0])  # no augmentation: identical rows
    np.testing.assert_array_equal(
        batch["label"].reshape(4, 4)[1:], batch["label"].reshape(4, 4)[:3]
    )
    ra = randaugment.RandAugment(2, 9.0)
    source = _in_memory(repeats=4, rand_augment=ra, erase_probability=0.5)
    source.augment = "pad_crop_flip"
    batch = next(source.train_batches(16, seed=2, start_step=5))
    copies = batch["image"].reshape(4, 4, -1)
    same = sum(np.array_equal(copies[a, r], copies[b, r])
               for a, b in itertools.combinations(range(4), 2) for r in range(4))  # fmt: skip
    assert same <= 2  # of 24 pairs of copies


@pytest.mark.parametrize("processes", [2, 4])
def test_in_memory_batches_are_the_same_on_any_number_of_processes(processes, monkeypatch):
    ra = randaugment.RandAugment(2, 7.0, 0.5)
    source = _in_memory(repeats=2, rand_augment=ra, erase_probability=0.5)
    source.augment = "pad_crop_flip"
    whole = list(itertools.islice(source.train_batches(16, seed=1, start_step=3), 4))
    resumed = next(source.train_batches(16, seed=1, start_step=5))
    np.testing.assert_array_equal(resumed["image"], whole[2]["image"])
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    parts = []
    for index in range(processes):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        parts.append(list(itertools.islice(source.train_batches(16, seed=1, start_step=3), 4)))
    for step, batch in enumerate(whole):
        for key in ("image", "label"):
            joined = np.concatenate([part[step][key] for part in parts])
            np.testing.assert_array_equal(joined, batch[key])


def _image_source(repeats, **preprocess):
    rng = np.random.default_rng(0)
    records = [(rng.integers(0, 256, (12, 14, 3), np.uint8), i % 3) for i in range(40)]
    p = preprocessing.Preprocess(image_size=8, **preprocess)
    return image_source.ImageSource(records, records[:8], 3, p, workers=2, repeats=repeats)


@pytest.mark.parametrize("processes", [2, 4])
def test_image_source_copies_differ_and_batches_do_not_depend_on_processes(processes, monkeypatch):
    ra = randaugment.RandAugment(2, 9.0, 0.5)
    source = _image_source(2, rand_augment=ra, erase_probability=0.5)
    ids = source.train_indices(8, 4, 3)
    np.testing.assert_array_equal(ids[:4], ids[4:])
    whole = [next(source.train_batches(8, seed=4, start_step=s)) for s in range(3, 6)]
    for batch in whole:
        np.testing.assert_array_equal(batch["label"][:4], batch["label"][4:])
        for r in range(4):
            assert not np.array_equal(batch["image"][r], batch["image"][r + 4])
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    for step, batch in zip(range(3, 6), whole, strict=True):
        parts = []
        for index in range(processes):
            monkeypatch.setattr(jax, "process_index", lambda index=index: index)
            parts.append(next(source.train_batches(8, seed=4, start_step=step)))
        np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), batch["image"])


def test_evaluation_is_not_repeated():
    source = _image_source(2)
    ids = np.concatenate(list(source.eval_indices(4)))
    np.testing.assert_array_equal(ids, np.arange(8))
    labels = np.concatenate([b["label"] for b in _in_memory(repeats=4).eval_batches(8)])
    np.testing.assert_array_equal(labels, _in_memory().eval_labels)
