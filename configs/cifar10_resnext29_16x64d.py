"""ResNeXt-29 (16x64d) on CIFAR-10: 3.58% test error in Table 7 of the paper.

python scripts/train.py --config=configs/cifar10_resnext29_16x64d.py
"""

from resnext_jax.experiments import config_files

cifar = config_files.sibling(__file__, "cifar")


def get_config():
    return cifar.get_config("model=resnext29_16x64d,dataset=cifar10")
