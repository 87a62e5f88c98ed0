"""scripts/check_dataset.py and resnext_jax/data/checks.py: every rejected and odd file of a
split listed, rejected meaning exactly what training rejects."""

import itertools
import subprocess
import sys

import numpy as np
import pytest

from resnext_jax.data import checks, image_source, preprocessing, sources, tfds_source
from resnext_jax.experiments import config_files
from tests import fake_data
from tests.data.test_tfds_source import encode, labelled_image, prepare

default = config_files.config_module("default")
REJECTED = fake_data.rejected_image_files()
ODD = fake_data.odd_image_files()
# What each rejection says (PIL's own words for the truncated JPEG).
REASONS = {"truncated.jpg": "OSError: image file is truncated",
           "empty.jpg": "UnidentifiedImageError: not an image: an empty file",
           "._apple.jpg": "not an image: a macOS AppleDouble file",
           "garbage.png": "not an image: 500 bytes in no format PIL reads, beginning b'",
           "thin.png": "ImageShapeError: 1x20000 pixels: aspect ratio beyond 1:100"}  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/a: 3 good images and every rejected and odd file; train/b: 3 good images."""
    root = tmp_path_factory.mktemp("check")
    rng = np.random.default_rng(0)
    for name in "ab":
        good = {f"good{i}.jpg": fake_data.encode_image(labelled_image(i, (64, 80, 3), rng), "JPEG")
                for i in range(3)}  # fmt: skip
        fake_data.write_files(root / "train" / name, good)
    fake_data.write_files(root / "train" / "a", REJECTED)
    fake_data.write_files(root / "train" / "a", {name: data for name, (data, _) in ODD.items()})
    return root


def test_scan_lists_each_rejected_and_odd_file_with_its_reason(folder):
    records, num_classes = checks.folder_split(folder, "train")
    problems = list(checks.scan(records, num_classes, preprocessing.Preprocess(), workers=2))
    found = {(p.where.rpartition("/")[2], p.kind) for p in problems}
    expected = {(n, "rejected") for n in REJECTED} | {(n, kind) for n, (_, kind) in ODD.items()}
    assert found == expected and len(problems) == len(expected)
    for p in problems:
        assert p.where.startswith(f"{folder}/train/a/")
        name = p.where.rpartition("/")[2]
        if p.kind == "rejected":
            assert REASONS[name] in p.reason, p
    reasons = {p.where.rpartition("/")[2]: p.reason for p in problems}
    assert reasons["palette.png"] == "P (palette with transparency, which is dropped)"
    assert reasons["gray16.png"] == "I;16 (16-bit, scaled to 8)"
    assert reasons["tiny.png"] == "8x8 pixels, upscaled over 8x to the 224-pixel crop"
    assert reasons["wide.png"] == "600x30 pixels, beyond 1:10"
    assert checks.summary(problems, len(records)).startswith(
        "17 examples checked: 5 rejected, 4 mode, 1 tiny, 1 aspect. Training stops"
    )
    assert checks.summary([], 6) == "6 examples checked: 0 rejected, 0 mode, 0 tiny, 0 aspect"


def test_rejected_is_what_training_rejects(folder):
    """Training under skip finds exactly the examples the scan rejects."""
    records, num_classes = checks.folder_split(folder, "train")
    rejected = {p.where for p in checks.scan(records, num_classes, preprocessing.Preprocess())
                if p.kind == "rejected"}  # fmt: skip
    p = preprocessing.Preprocess(image_size=16)
    source = image_source.ImageSource(records, records, 2, p, workers=2, bad_examples="skip")
    batches = list(itertools.islice(source.train_batches(8, seed=0), 3))  # 17 examples, 2 epochs
    assert sum(b["skipped"] for b in batches) > 0
    list(source.eval_batches(17))
    assert {str(records.paths[i]) for _, i in source.bad.found} == rejected


def test_scan_of_a_tfds_split_names_split_and_index(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    examples = [{"id": f"x_{i}", "label": i % 10,
                 "image": encode(labelled_image(i, (32, 32, 3), rng), "PNG")}
                for i in range(6)]  # fmt: skip
    examples[2]["label"] = -1  # TFDS's "no label", as in test splits
    examples[4]["image"] = b"not a png"
    prepare("cifar10", tmp_path, {"train": examples, "test": examples[:2]}, monkeypatch)
    records, num_classes = checks.tfds_split("cifar10", "train", str(tmp_path))
    assert isinstance(records, tfds_source.Records) and num_classes == 10
    problems = list(checks.scan(records, num_classes, preprocessing.Preprocess(image_size=32)))
    order = [records[i] for i in range(6)]  # TFDS shuffles the examples when it prepares them
    unlabelled = next(i for i, (_, label) in enumerate(order) if label == -1)
    garbage = next(i for i, (image, _) in enumerate(order) if image == b"not a png")
    assert [str(p) for p in problems] == [
        f"TFDS cifar10 split 'train' example {i}: rejected: {reason}"
        for i, reason in sorted([
            (unlabelled, "label -1 is outside the 10 classes (0 to 9)"),
            (garbage, "UnidentifiedImageError: not an image: 9 bytes in no format PIL reads, "
                      "beginning b'not a pn'"),
        ])
    ]  # fmt: skip
    # The training source of the same split, under skip, leaves out the same two.
    config = default.get_config()
    config.dataset.update(name="cifar10", data_dir=str(tmp_path), eval_split="train",
                          bad_examples="skip", workers=2)  # fmt: skip
    evals = next(sources.get_source(config).eval_batches(6))
    assert evals["skipped"] == 2 and np.flatnonzero(~evals["mask"]).tolist() == sorted(
        [unlabelled, garbage]
    )


def run_script(*args):
    return subprocess.run([sys.executable, "scripts/check_dataset.py", *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.slow
def test_script_exits_1_with_a_line_per_problem_and_0_when_clean(folder, tmp_path):
    done = run_script(f"--data_dir={folder}", "--split=train", "--workers=2")
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(REJECTED) + len(ODD) + 1
    assert f"{folder}/train/a/thin.png: rejected: ImageShapeError" in done.stdout
    assert lines[-1].startswith("17 examples checked: 5 rejected, 4 mode, 1 tiny, 1 aspect")
    good = fake_data.encode_image(np.zeros((40, 40, 3), np.uint8), "PNG")
    fake_data.write_files(tmp_path / "train" / "a", {"ok.png": good})
    done = run_script(f"--data_dir={tmp_path}", "--image_size=32")
    assert done.returncode == 0 and done.stdout.startswith("1 examples checked: 0 rejected")
    done = run_script(f"--data_dir={tmp_path}", "--split=val")
    assert done.returncode == 1 and f"no folder {tmp_path}/val" in done.stderr
