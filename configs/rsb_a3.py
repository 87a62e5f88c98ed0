"""ResNeXt-50 32x4d under "ResNet strikes back" procedure A3 (configs/rsb.py has the settings).

    python scripts/train.py --config=configs/rsb_a3.py
    python scripts/train.py --config=configs/rsb.py:procedure=a3,model=resnet50

Published ImageNet top-1 (timm): ResNeXt-50 32x4d 79.26%, ResNet-50 78.05%.
"""

from resnext_jax.experiments import config_files

rsb = config_files.sibling(__file__, "rsb")


def get_config():
    return rsb.get_config("procedure=a3,model=resnext50_32x4d")
