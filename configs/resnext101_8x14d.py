"""ResNeXt-101 (8x14d) on ImageNet: 21.3% top-1 error in Table 3 of the paper.

python scripts/train.py --config=configs/resnext101_8x14d.py
"""

from configs import table3


def get_config():
    return table3.get_config("depth=101,cw=8x14d")
