"""ResNeXt-101 (32x4d) on ImageNet: 21.2% top-1 error in Table 3 of the paper.

python scripts/train.py --config=configs/resnext101_32x4d.py
"""

from resnext_jax.experiments import config_files

table3 = config_files.sibling(__file__, "table3")


def get_config():
    return table3.get_config("depth=101,cw=32x4d")
