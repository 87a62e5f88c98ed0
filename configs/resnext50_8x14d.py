"""ResNeXt-50 (8x14d) on ImageNet: 22.3% top-1 error in Table 3 of the paper.

python scripts/train.py --config=configs/resnext50_8x14d.py
"""

from configs import table3


def get_config():
    return table3.get_config("depth=50,cw=8x14d")
