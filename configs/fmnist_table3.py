"""A mini Table 3 on Fashion-MNIST: the paper's five cardinality x width settings, offline.

    python scripts/train.py --config=configs/fmnist_table3.py:cw=8x14d
    python scripts/sweep.py --config=configs/fmnist_table3.py --seeds=3 --run
    python scripts/report.py workdirs/sweeps/fmnist_table3

The network is the Fashion-MNIST default's ResNeXt-11 (a strided 3x3 stem, three stages of
one bottleneck at 14x14, 7x7 and 4x4) with 32 planes in its first stage, half of ImageNet's
64. Table 3's `d` is the group width at 64 planes (`base_width`), so at 32 planes every
3x3 conv is exactly half as wide as in the paper's ResNeXt-50 (32, 40, 48, 56, 64 in the
first stage for 1x64d ... 32x4d) and the five settings keep the paper's complexity ratios
(`python scripts/model_stats.py` prints their parameters and multiply-adds). The recipe is
the default's, shortened to `EPOCHS` so the 15 runs of 3 seeds fit in about two hours on
a 2-core CPU.
"""

from resnext_jax.experiments import config_files
from resnext_jax.models import variants

fashion_mnist = config_files.sibling(__file__, "fashion_mnist")

SETTINGS = ("1x64d", "2x40d", "4x24d", "8x14d", "32x4d")
EPOCHS = 1.5


def get_config(arg="cw=32x4d"):
    args = config_files.parse_family_args(arg, allowed={"cw": SETTINGS}, defaults={"cw": "32x4d"})
    config = fashion_mnist.get_config()
    cardinality, width = (int(v) for v in args["cw"].rstrip("d").split("x"))
    config.model.cardinality = cardinality
    config.model.base_width = width
    variants.validate(config.model)
    config.num_epochs = EPOCHS
    return config


def get_sweep():
    """The five settings, as config arguments."""
    return [f"cw={cw}" for cw in SETTINGS]
