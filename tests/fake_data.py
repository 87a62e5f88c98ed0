"""Small datasets in the formats the readers take, written for tests."""

import gzip

import numpy as np


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
