"""Image folders list their files through symbolic links: linked class folders, linked
subfolders and linked files, each real folder once (a link cycle ends)."""

import os

import numpy as np
import pytest

from resnext_jax.data import base, image_source, preprocessing
from tests import fake_data


def png(level):
    return fake_data.encode_image(np.full((12, 10, 3), level, np.uint8), "PNG")


def test_symlinked_folders_and_files_are_followed_once(tmp_path):
    elsewhere = fake_data.write_files(tmp_path / "elsewhere" / "cats", {"c0.png": png(10)})
    fake_data.write_files(tmp_path / "elsewhere" / "more_dogs", {"d9.jpg": png(20)})
    fake_data.write_files(tmp_path / "elsewhere" / "loose", {"single.png": png(30)})
    train = tmp_path / "data" / "train"
    dogs = fake_data.write_files(train / "dogs", {"d0.png": png(40)})
    os.symlink(elsewhere, train / "cats")  # a linked class folder
    os.symlink(tmp_path / "elsewhere" / "more_dogs", dogs / "more")  # a linked subfolder
    os.symlink(tmp_path / "elsewhere" / "loose" / "single.png", dogs / "linked.png")
    os.symlink(dogs, dogs / "again")  # a cycle: dogs/again/again/... is dogs itself
    os.symlink(tmp_path / "nowhere.png", dogs / "dangling.png")  # fails loudly, not silently
    records = image_source.FolderRecords(train)
    assert records.classes == ["cats", "dogs"]
    found = [str(p.relative_to(train)) for p in records.paths]
    expected = ["cats/c0.png", "dogs/d0.png", "dogs/dangling.png", "dogs/linked.png",
                "dogs/more/d9.jpg"]  # fmt: skip
    assert found == expected
    np.testing.assert_array_equal(records.labels, [0, 1, 1, 1, 1])
    p = preprocessing.Preprocess(image_size=8)
    source = image_source.ImageSource(records, records, 2, p, workers=1)
    with pytest.raises(base.DataError, match="dogs/dangling.png: FileNotFoundError"):
        next(source.train_batches(5, seed=0))
    source = image_source.ImageSource(records, records, 2, p, workers=1, bad_examples="skip")
    assert next(source.train_batches(5, seed=0))["skipped"] == 1


def test_listing_keeps_the_sorted_order_of_plain_folders(tmp_path):
    """Resumed runs depend on example indices: the walk lists what rglob listed, in order."""
    names = ["b/2.png", "a/x/1.PNG", "a/10.jpg", "a/9.jpeg", "a/x/y/0.webp", "a/skip.txt"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    walked = image_source.image_files(tmp_path)
    globbed = sorted(f for f in tmp_path.rglob("*")
                     if f.suffix.lower() in image_source.IMAGE_EXTENSIONS)  # fmt: skip
    assert walked == globbed and len(walked) == 5
