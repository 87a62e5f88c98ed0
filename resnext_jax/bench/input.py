"""Input pipeline throughput: our image-folder pipeline beside torchvision's, same files, same work.

    python scripts/benchmark_input.py                      # 320 JPEGs, 2 workers, markdown
    python scripts/benchmark_input.py --workers=4 --images=600 --format=json

Writes ImageNet-like JPEGs (sizes around ImageNet's typical 500x375, varied, in class
subfolders) into a temporary folder, then decodes and augments them with the paper's training
recipe, at 224, in two pipelines:

- ours: `resnext_jax.data.image_source` over the folder (threads), random-resized crop, flip,
  color jitter 0.4, PCA lighting 0.1, normalization, float32 NHWC batches;
- torchvision: `ImageFolder` + `DataLoader` (worker processes) with RandomResizedCrop,
  RandomHorizontalFlip, ColorJitter(0.4, 0.4, 0.4), a PCA lighting transform, ToTensor and
  Normalize; both resize bicubically (fb.resnet.torch's choice) unless --interpolation says.

Both use --workers workers and the same batch size. Each round times one pass over the files in
each pipeline, in alternating order, after one untimed warm-up pass of each; a row shows the
median over rounds. "per CPU-second" divides images by the CPU time of the process and its
workers (threads or child processes) during the pass, so that it counts the work each
pipeline does per image even on a machine shared with other jobs.
"""

import argparse
import importlib.metadata
import json
import os
import pathlib
import statistics
import tempfile
import time

import numpy as np
import PIL.features
import PIL.Image
import psutil

from resnext_jax.data import image_source, preprocessing

# Width x height of typical ImageNet photos (landscape and portrait at 4:3 and 3:2, and some
# larger ones), each jittered by up to 10%.
SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (640, 480), (800, 600))


def write_images(root, count, classes, seed=0):
    """`count` JPEGs in `classes` subfolders of root/train: smooth color fields with texture."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        w, h = (int(v * rng.uniform(0.9, 1.1)) for v in (w, h))
        coarse = rng.integers(0, 256, (rng.integers(4, 12), rng.integers(4, 12), 3), np.uint8)
        image = np.asarray(PIL.Image.fromarray(coarse).resize((w, h), PIL.Image.BICUBIC))
        noise = rng.normal(0, 12, (h, w, 3))
        image = np.clip(image + noise, 0, 255).astype(np.uint8)
        folder = root / "train" / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(image).save(folder / f"{i:05d}.JPEG", quality=90)


class Lighting:
    """PCA lighting noise on a CHW tensor in [0, 1], as fb.resnet.torch's (for torchvision)."""

    def __init__(self, std):
        import torch

        self.std = std
        self.eigval = torch.from_numpy(preprocessing.IMAGENET_EIGVAL)
        self.eigvec = torch.from_numpy(preprocessing.IMAGENET_EIGVEC)

    def __call__(self, image):
        import torch

        alpha = torch.randn(3) * self.std
        return image + (self.eigvec @ (alpha * self.eigval))[:, None, None]


def torchvision_loader(root, args):
    import torch
    import torchvision.transforms as T
    from torchvision import datasets

    mode = getattr(T.InterpolationMode, args.interpolation.upper())
    transform = T.Compose([
        T.RandomResizedCrop(args.image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            interpolation=mode),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.4, 0.4, 0.4),
        T.ToTensor(),
        Lighting(0.1),
        T.Normalize(preprocessing.IMAGENET_MEAN, preprocessing.IMAGENET_STD),
    ])  # fmt: skip
    dataset = datasets.ImageFolder(root / "train", transform)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
        drop_last=True, persistent_workers=True,
        # Not fork: this process has started JAX's and our pipeline's threads.
        multiprocessing_context="spawn",
    )  # fmt: skip


def our_source(root, args):
    preprocess = preprocessing.Preprocess(image_size=args.image_size,
                                          interpolation=args.interpolation)  # fmt: skip
    return image_source.image_folder(root, "train", "train", preprocess, args.workers)


def cpu_seconds():
    """CPU time of this process (all threads) and its live children."""
    me = psutil.Process()
    times = [me.cpu_times()] + [c.cpu_times() for c in me.children(recursive=True)]
    return sum(t.user + t.system for t in times)


def time_pass(run):
    """(images, wall seconds, CPU seconds) of one pass."""
    cpu, start = cpu_seconds(), time.perf_counter()
    images = run()
    return images, time.perf_counter() - start, cpu_seconds() - cpu


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.images < args.batch_size:
        parser.error("--images must be at least --batch_size")
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(args.dir or tmp)
        if not (root / "train").is_dir():
            write_images(root, args.images, args.classes)
        results = run(root, args)
    if args.format == "json":
        print(json.dumps(results, indent=2))
    else:
        print(markdown(results))


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2, help="threads (ours), processes (torch)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--interpolation", choices=tuple(preprocessing.INTERPOLATIONS),
                        default="bicubic")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", help="reuse (or create) the images here, not in a temp folder")
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown")
    return parser


def run(root, args):
    source = our_source(root, args)
    steps = source.num_train // args.batch_size
    passes = {"ours": 0}

    def ours():
        start = passes["ours"] * steps
        passes["ours"] += 1
        batches = source.train_batches(args.batch_size, seed=0, start_step=start)
        count = sum(len(next(batches)["label"]) for _ in range(steps))
        batches.close()
        return count

    loader = torchvision_loader(root, args)

    def tv():
        return sum(len(labels) for _, labels in loader)

    pipelines = {"ours": ours, "torchvision": tv}
    for fn in pipelines.values():  # warm-up: thread pool, worker processes, page cache
        fn()
    trials = {name: [] for name in pipelines}
    for r in range(args.rounds):
        order = list(pipelines) if r % 2 == 0 else list(pipelines)[::-1]
        for name in order:
            trials[name].append(time_pass(pipelines[name]))
    rows = {}
    for name, runs in trials.items():
        rows[name] = {
            "images_per_pass": runs[0][0],
            "images_per_s": statistics.median(n / wall for n, wall, _ in runs),
            "images_per_s_per_worker": statistics.median(n / wall for n, wall, _ in runs)
            / args.workers,
            "images_per_cpu_s": statistics.median(n / cpu for n, _, cpu in runs),
            "wall_s": [round(wall, 3) for _, wall, _ in runs],
            "cpu_s": [round(cpu, 3) for _, _, cpu in runs],
        }
    return {
        "images": source.num_train,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "interpolation": args.interpolation,
        "rounds": args.rounds,
        "cpus": len(os.sched_getaffinity(0)),
        "versions": {
            p: importlib.metadata.version(p) for p in ("pillow", "numpy", "torch", "torchvision")
        },  # fmt: skip
        "libjpeg_turbo": PIL.features.check_feature("libjpeg_turbo"),
        "pipelines": rows,
    }


def markdown(results):
    lines = [
        f"{results['images']} JPEGs, {results['workers']} workers, batch "
        f"{results['batch_size']}, {results['image_size']}px {results['interpolation']}, "
        f"median of {results['rounds']} rounds, {results['cpus']} CPUs visible",
        "",
        "| pipeline | images/s | images/s per worker | images per CPU-second |",
        "|---|---|---|---|",
    ]
    for name, row in results["pipelines"].items():
        lines.append(
            f"| {name} | {row['images_per_s']:.0f} | {row['images_per_s_per_worker']:.0f} | "
            f"{row['images_per_cpu_s']:.0f} |"
        )
    ours, tv = (results["pipelines"][k]["images_per_cpu_s"] for k in ("ours", "torchvision"))
    lines += ["", f"ours / torchvision, per CPU-second: {ours / tv:.2f}x"]
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    lines.append(f"({versions}; libjpeg-turbo: {results['libjpeg_turbo']})")
    return "\n".join(lines)
