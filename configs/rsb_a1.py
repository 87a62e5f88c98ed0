"""ResNeXt-50 32x4d under "ResNet strikes back" procedure A1 (configs/rsb.py has the settings).

    python scripts/train.py --config=configs/rsb_a1.py
    python scripts/train.py --config=configs/rsb.py:procedure=a1,model=resnet50

Published ImageNet top-1 (timm): ResNeXt-50 32x4d 80.53%, ResNet-50 80.38%.
"""

from resnext_jax.experiments import config_files

rsb = config_files.sibling(__file__, "rsb")


def get_config():
    return rsb.get_config("procedure=a1,model=resnext50_32x4d")
