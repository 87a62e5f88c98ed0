"""List the examples of a split that training would reject, and the odd ones it would take.

    python scripts/check_dataset.py --data_dir=DIR --split=train          # DIR/train/CLASS/*.jpg
    python scripts/check_dataset.py --tfds=imagenet2012 --split=validation [--data_dir=DIR]

One line per problem (path or TFDS split and index, kind, reason), then a summary; exit
status 0 if there is none, 1 otherwise. What counts as what: resnext_jax/data/checks.py.
"""

import argparse
import sys

from resnext_jax.data import base, checks, preprocessing


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="", help="image folder root, or TFDS data dir")
    parser.add_argument("--tfds", default="", help="a TFDS dataset name instead of a folder")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image_size", type=int, default=224,
                        help="the training crop, for what counts as tiny")  # fmt: skip
    parser.add_argument("--workers", type=int, default=0, help="threads (0: one per core)")
    args = parser.parse_args(argv)
    if not (args.tfds or args.data_dir):
        parser.error("give --data_dir=DIR (an image folder) or --tfds=NAME")
    try:
        if args.tfds:
            records, num_classes = checks.tfds_split(args.tfds, args.split, args.data_dir)
        else:
            records, num_classes = checks.folder_split(args.data_dir, args.split)
        preprocess = preprocessing.Preprocess(image_size=args.image_size)
        problems = []
        for problem in checks.scan(records, num_classes, preprocess, args.workers):
            print(problem, flush=True)
            problems.append(problem)
    except base.DataError as e:
        sys.exit(f"error: {e}")
    print(checks.summary(problems, len(records)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
