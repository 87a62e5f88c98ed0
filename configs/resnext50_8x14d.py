"""ResNeXt-50 (8x14d) on ImageNet: 22.3% top-1 error in Table 3 of the paper.

python scripts/train.py --config=configs/resnext50_8x14d.py
"""

from resnext_jax.experiments import config_files

table3 = config_files.sibling(__file__, "table3")


def get_config():
    return table3.get_config("depth=50,cw=8x14d")
