"""ResNet-101 (1x64d) on ImageNet: 22.0% top-1 error in Table 3 of the paper.

python scripts/train.py --config=configs/resnet101.py
"""

from resnext_jax.experiments import config_files

table3 = config_files.sibling(__file__, "table3")


def get_config():
    return table3.get_config("depth=101,cw=1x64d")
