"""Bad examples never train silently: labels out of range, undecodable images, the
`dataset.bad_examples` policy (error: stop and say what to do; skip: the next good example
in training, masked out of evaluation), and the "skipped" count of every batch."""

import itertools

import numpy as np
import pytest

from resnext_jax.data import base, image_source, in_memory, preprocessing, sources, tfds_source
from resnext_jax.experiments import config_files
from tests import fake_data

default = config_files.config_module("default")
REJECTED = fake_data.rejected_image_files()


def good_png(label, rng):
    pixels = (40 + 60 * label + rng.integers(0, 30, (20 + label, 24, 3))).astype(np.uint8)
    return fake_data.encode_image(pixels, "PNG")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train: 4 good images in each of a, b, c, the 5 rejected files in b (17 in all);
    val: 2 good images in each class, 2 rejected files in a."""
    root = tmp_path_factory.mktemp("bad_folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for label, name in enumerate("abc"):
            good = {f"{i}.png": good_png(label, rng) for i in range(n)}
            fake_data.write_files(root / split / name, good)
    fake_data.write_files(root / "train" / "b", REJECTED)
    fake_data.write_files(root / "val" / "a", {k: REJECTED[k] for k in ("empty.jpg", "thin.png")})
    return root


def is_bad(records):
    return np.array([p.name in REJECTED for p in records.paths])


def test_error_names_the_file_the_fault_and_the_way_on(folder):
    source = fake_data.folder_source(folder)
    with pytest.raises(base.DataError) as error:
        next(source.train_batches(source.num_train, seed=0))  # one batch holds every example
    message = str(error.value)
    assert any(f"{folder / 'train' / 'b' / name}: " in message for name in REJECTED), message
    assert "--config.dataset.bad_examples=skip" in message
    assert "scripts/check_dataset.py" in message
    with pytest.raises(base.DataError, match=r"val/a/empty.jpg: UnidentifiedImageError: not an "
                                             r"image: an empty file"):  # fmt: skip
        list(source.eval_batches(4))


def next_good(index, bad):
    """The example that replaces `index` under skip, found here by a plain scan."""
    return next(j % len(bad) for j in range(index, index + len(bad)) if not bad[j % len(bad)])


def test_skip_trains_on_the_next_good_example_whatever_the_threads_or_resume(folder):
    source = fake_data.folder_source(folder, bad_examples="skip")
    records, p = source.train_records, source.preprocess
    bad = is_bad(records)
    assert bad.sum() == 5 and source.num_train == 17
    batches = list(itertools.islice(source.train_batches(8, seed=3), 6))  # 3 epochs
    for step, batch in enumerate(batches):
        ids = source.train_indices(8, 3, step)
        assert batch["skipped"] == bad[ids].sum()
        for row, index in enumerate(ids):
            good = next_good(index, bad)
            rng = np.random.default_rng([3, step, row])
            expected = preprocessing.train_image(records.paths[good], rng, p)
            np.testing.assert_array_equal(batch["image"][row], expected)
            assert batch["label"][row] == records.labels[good]
    assert sum(b["skipped"] for b in batches) > 0
    # A fresh source on one thread, resumed at step 4: the same batches.
    resumed = fake_data.folder_source(folder, bad_examples="skip", workers=1)
    for step, batch in enumerate(resumed.train_batches(8, seed=3, start_step=4), start=4):
        for key in ("image", "label", "skipped"):
            np.testing.assert_array_equal(batch[key], batches[step][key])
        if step == 5:
            break


def test_skip_masks_bad_examples_out_of_evaluation(folder):
    source = fake_data.folder_source(folder, bad_examples="skip")
    bad = is_bad(source.eval_records)
    assert (source.num_eval, bad.sum()) == (8, 2)
    batches = list(source.eval_batches(3))  # 3 batches, the last with one row of padding
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(mask, np.append(~bad, False))
    assert [b["skipped"] for b in batches] == [int(bad[i : i + 3].sum()) for i in (0, 3, 6)]
    images = np.concatenate([b["image"] for b in batches])
    assert not images[~mask].any() and images[mask].any(axis=(1, 2, 3)).all()
    labels = np.concatenate([b["label"] for b in batches])[:8]
    np.testing.assert_array_equal(labels[~bad], source.eval_records.labels[~bad])


def test_a_split_with_no_good_example_says_so(tmp_path):
    fake_data.write_files(tmp_path / "train" / "a", REJECTED)
    fake_data.write_files(tmp_path / "val" / "a", {"x.png": good_png(0, np.random.default_rng())})
    source = fake_data.folder_source(tmp_path, bad_examples="skip")
    with pytest.raises(base.DataError, match="none of the 5 examples of the train split"):
        next(source.train_batches(2, seed=0))


def test_replacement_decodes_each_bad_example_once_and_wraps_around():
    bad, loads = {3, 4, 9}, []

    def load(i):
        loads.append(i)
        if i in bad:
            raise base.BadExample(f"example {i}", "broken")
        return i * 10

    policy = base.BadExamples("skip")
    assert policy.first_good("train", 2, 10, load) == (20, False)
    assert policy.first_good("train", 3, 10, load) == (50, True)
    assert policy.first_good("train", 4, 10, load) == (50, True)
    assert policy.first_good("train", 9, 10, load) == (0, True)  # past the end: example 0
    assert sorted(i for i in loads if i in bad) == [3, 4, 9]  # each bad one tried once
    assert policy.load_or_none("eval", 9, load) is None  # another split: its own record
    with pytest.raises(base.DataError, match="example 3: broken. Fix or delete it"):
        base.BadExamples("error").first_good("train", 3, 10, load)


def test_policy_value_is_checked_for_every_source():
    with pytest.raises(base.DataError, match=r"bad_examples='skp'; choose one of \('error', "):
        base.check_policy("skp")
    config = default.get_config()
    config.dataset.update(name="synthetic", image_size=8, num_train_examples=16,
                          num_eval_examples=8, bad_examples="skp")  # fmt: skip
    with pytest.raises(base.DataError, match="choose one of"):
        sources.get_source(config)
    del config.dataset["bad_examples"]  # a config from before the setting: "error"
    source = sources.get_source(config)
    assert next(source.train_batches(8, seed=0))["skipped"] == 0
    assert all(b["skipped"] == 0 for b in source.eval_batches(5))


class ListSource:
    """A stand-in for a TFDS data source: records by index."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]


def test_tfds_labels_out_of_range_are_bad_examples():
    rng = np.random.default_rng(1)
    labels = [0, 1, 5, 2, -1, 1]  # 3 classes: examples 2 and 4 are out of range
    records = tfds_source.Records(
        ListSource([{"image": good_png(max(v, 0) % 3, rng), "label": v} for v in labels]),
        "image", "label", name="TFDS fake split 'train'",
    )  # fmt: skip
    p = preprocessing.Preprocess(image_size=8)
    strict = image_source.ImageSource(records, records, 3, p, workers=2)
    # The first bad one in the batch's order is reported: 5 or -1.
    reported = r"TFDS fake split 'train' example (2: label 5|4: label -1) is outside the 3 classes"
    with pytest.raises(base.DataError, match=reported + r" \(0 to 2\)"):
        next(strict.train_batches(6, seed=0))
    lenient = image_source.ImageSource(records, records, 3, p, workers=2, bad_examples="skip")
    batch = next(lenient.train_batches(6, seed=0))
    assert batch["skipped"] == 2 and sorted(batch["label"]) == [0, 1, 1, 1, 2, 2]
    evals = next(lenient.eval_batches(6))
    assert evals["skipped"] == 2 and evals["mask"].tolist() == [1, 1, 0, 1, 0, 1]


def test_idx_labels_out_of_range_name_the_file_and_example(tmp_path):
    fake_data.write_fake_fashion_mnist(tmp_path)
    assert in_memory.fashion_mnist(str(tmp_path)).num_train == 64
    labels = np.random.default_rng(0).integers(0, 10, 64)
    labels[[5, 40]] = 10
    fake_data.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    with pytest.raises(base.DataError) as error:
        in_memory.fashion_mnist(str(tmp_path))
    assert str(error.value).startswith(
        f"{tmp_path}/train-labels-idx1-ubyte.gz: example 5 has label 10, outside the 10 "
        "classes (0 to 9); 2 label(s) in all"
    )
    fake_data.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels[:63] % 10)
    with pytest.raises(base.DataError, match="64 images but 63 labels"):
        in_memory.fashion_mnist(str(tmp_path))
