"""Small datasets in the formats the readers take, written for tests."""

import gzip
import io

import numpy as np
import PIL.Image

from resnext_jax.data import sources
from resnext_jax.experiments import config_files


def write_idx(path, array):
    """An IDX file of unsigned bytes, gzipped: the format of (Fashion-)MNIST."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_fake_fashion_mnist(folder):
    """A small Fashion-MNIST-shaped dataset in IDX files (images of the label's brightness):
    64 training and 24 test images."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 24)):
        labels = rng.integers(0, 10, n)
        images = labels[:, None, None] * 25 + rng.integers(0, 20, (n, 28, 28))
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


def encode_image(pixels, fmt, mode=None, **options):
    """Encoded bytes of a uint8 array (or a PIL image) in format `fmt`, optionally converted."""
    image = pixels if isinstance(pixels, PIL.Image.Image) else PIL.Image.fromarray(pixels)
    buffer = io.BytesIO()
    (image.convert(mode) if mode else image).save(buffer, format=fmt, **options)
    return buffer.getvalue()


# What macOS leaves beside a file copied to a foreign disk, named `._NAME`: its resource
# fork in the AppleDouble format (magic 0x00051607), not an image.
APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)


def rejected_image_files():
    """{file name: bytes} of each kind of file that training rejects."""
    rng = np.random.default_rng(7)
    photo = encode_image(rng.integers(0, 256, (64, 48, 3), np.uint8), "JPEG")
    return {
        "truncated.jpg": photo[: len(photo) // 2],
        "empty.jpg": b"",
        "._apple.jpg": APPLE_DOUBLE,
        "garbage.png": rng.integers(0, 256, 500, np.uint8).tobytes(),
        "thin.png": encode_image(np.full((20000, 1), 128, np.uint8), "PNG"),  # 1x20000
    }


def odd_image_files():
    """{file name: (bytes, kind)} of files that training takes but converts or stretches,
    each odd in one way (resnext_jax/data/checks.py's kinds)."""
    rng = np.random.default_rng(8)
    pixels = rng.integers(0, 256, (64, 64, 3), np.uint8)
    palette = PIL.Image.fromarray(pixels).quantize(16)
    return {
        "cmyk.jpg": (encode_image(pixels, "JPEG", "CMYK"), "mode"),
        "gray16.png": (encode_image(pixels[..., 0].astype(np.uint16) * 257, "PNG"), "mode"),
        "palette.png": (encode_image(palette, "PNG", transparency=0), "mode"),
        "bilevel.png": (encode_image(pixels, "PNG", "1"), "mode"),
        "tiny.png": (encode_image(pixels[:8, :8], "PNG"), "tiny"),
        "wide.png": (encode_image(rng.integers(0, 256, (30, 600, 3), np.uint8), "PNG"), "aspect"),
    }


def write_files(folder, files):
    """Write {name: bytes} into `folder` (made if missing); the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def folder_source(root, **overrides):
    """The source of the image folder `root` (splits train and val) at 16 px, 2 workers."""
    config = config_files.config_module("default").get_config()
    settings = dict(name="image_folder", data_dir=str(root), eval_split="val", image_size=16)
    config.dataset.update({**settings, "workers": 2, **overrides})
    return sources.get_source(config)
