"""ResNeXt-50 32x4d under "ResNet strikes back" procedure A2 (configs/rsb.py has the settings).

    python scripts/train.py --config=configs/rsb_a2.py
    python scripts/train.py --config=configs/rsb.py:procedure=a2,model=resnet50

Published ImageNet top-1 (timm): ResNeXt-50 32x4d 80.44%, ResNet-50 79.83%.
"""

from resnext_jax.experiments import config_files

rsb = config_files.sibling(__file__, "rsb")


def get_config():
    return rsb.get_config("procedure=a2,model=resnext50_32x4d")
