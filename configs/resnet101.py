"""ResNet-101 (1x64d) on ImageNet: 22.0% top-1 error in Table 3 of the paper.

python scripts/train.py --config=configs/resnet101.py
"""

from configs import table3


def get_config():
    return table3.get_config("depth=101,cw=1x64d")
