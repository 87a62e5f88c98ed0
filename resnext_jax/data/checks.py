"""A split's examples checked before a long run (scripts/check_dataset.py).

Each example goes through `image_source.load_example` with the evaluation decode, as training
reads it, so "rejected" means exactly what training rejects: `dataset.bad_examples=error`
stops at it, `skip` leaves it out. Examples training takes but converts or stretches are
listed as "odd": a mode other than L and RGB (CMYK, 16-bit, palette, 1-bit, alpha), a tiny
image, an aspect ratio beyond 1:ODD_ASPECT.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import os
import pathlib
from collections.abc import Iterator

from resnext_jax.data import base, image_source, preprocessing, tfds_source

# What a Problem can be: the first one training rejects, the others it takes as they are.
KINDS = ("rejected", "mode", "tiny", "aspect")
# Beyond 1:10 the eval center crop sees under a tenth of the image; training still takes
# it, up to preprocessing.MAX_ASPECT.
ODD_ASPECT = 10
# A shorter side under image_size / TINY_FRACTION is upscaled more than 8x to fill the crop:
# mostly blur, often an icon or a thumbnail saved by mistake.
TINY_FRACTION = 8
CHUNK = 1024  # examples in flight in the thread pool
# What training makes of each mode other than L and RGB (preprocessing._to_mode).
MODE_NOTES = {"1": "1-bit black and white", "P": "palette", "CMYK": "colors may shift in RGB",
              "RGBA": "alpha dropped", "LA": "alpha dropped", "I;16": "16-bit, scaled to 8",
              "I;16B": "16-bit, scaled to 8", "I": "32-bit, scaled to 8 as if 16-bit",
              "F": "floating point, clipped to 0-255"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Problem:
    where: str  # a path, or a TFDS split and index
    kind: str  # one of KINDS
    reason: str

    def __str__(self):
        return f"{self.where}: {self.kind}: {self.reason}"


def folder_split(data_dir, split) -> tuple[image_source.FolderRecords, int]:
    """(records, class count) of image folder `data_dir/split/CLASS/*`."""
    root = pathlib.Path(data_dir) / split
    if not root.is_dir():
        raise base.DataError(f"no folder {root}: --data_dir=DIR needs DIR/{split}/CLASS/IMAGE")
    records = image_source.FolderRecords(root)
    return records, len(records.classes)


def tfds_split(name, split, data_dir="") -> tuple[tfds_source.Records, int]:
    """(records, class count) of TFDS dataset `name`'s `split`, its images still encoded."""
    splits, _, label_feature = tfds_source.open_splits(name, data_dir, {"train": split})
    return splits["train"], label_feature.num_classes


def example_problems(records, index, num_classes, preprocess) -> list[Problem]:
    """What is wrong with example `index`: one rejection, or the odd things about it."""
    odd = []

    def decode(item):
        preprocessing.eval_image(item, preprocess)
        odd.extend(_odd(preprocessing.open_image(item), preprocess.image_size))

    try:
        image_source.load_example(records, index, num_classes, decode)
    except base.BadExample as e:
        return [Problem(e.where, "rejected", e.reason)]
    where = image_source.describe(records, index)
    return [Problem(where, kind, reason) for kind, reason in odd]


def _odd(image, image_size) -> list[tuple[str, str]]:
    """(kind, reason) of each thing training takes but converts or stretches."""
    found = []
    if image.mode not in ("L", "RGB"):
        note = MODE_NOTES.get(image.mode, "converted")
        if image.mode == "P" and "transparency" in image.info:
            note = "palette with transparency, which is dropped"
        found.append(("mode", f"{image.mode} ({note})"))
    width, height = image.size
    if min(width, height) * TINY_FRACTION < image_size:
        found.append(("tiny", f"{width}x{height} pixels, upscaled over {TINY_FRACTION}x to "
                              f"the {image_size}-pixel crop"))  # fmt: skip
    if max(width, height) > ODD_ASPECT * min(width, height):
        found.append(("aspect", f"{width}x{height} pixels, beyond 1:{ODD_ASPECT}"))
    return found


def scan(records, num_classes, preprocess, workers=0) -> Iterator[Problem]:
    """Every problem of every example of `records`, in index order, checked in threads."""
    workers = workers or len(os.sched_getaffinity(0))
    check = functools.partial(example_problems, records, num_classes=num_classes,
                              preprocess=preprocess)  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="check") as pool:
        for start in range(0, len(records), CHUNK):
            for problems in pool.map(check, range(start, min(start + CHUNK, len(records)))):
                yield from problems


def summary(problems: list[Problem], num_examples) -> str:
    """One line: how many examples were checked and of each kind of problem, what to do."""
    counts = collections.Counter(p.kind for p in problems)
    line = f"{num_examples} examples checked: " + ", ".join(f"{counts[k]} {k}" for k in KINDS)
    if counts["rejected"]:
        line += (". Training stops at a rejected example: fix or delete them, or train with "
                 "--config.dataset.bad_examples=skip to leave them out")  # fmt: skip
    return line
