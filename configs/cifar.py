"""ResNeXt-29 on CIFAR with the paper's CIFAR recipe (Section 5.3, Table 7).

    python scripts/train.py --config=configs/cifar.py:model=resnext29_8x64d,dataset=cifar10

Recipe: batch 128 on 8 GPUs (16 images per BN), lr 0.1 divided by 10 at epochs 150 and
225 of 300, weight decay 5e-4, momentum 0.9; pad 4, random 32x32 crop, horizontal flip.
The paper's test errors (mean of 10 runs):

    model              params  CIFAR-10  CIFAR-100
    resnext29_8x64d    34.4M   3.65      17.77
    resnext29_16x64d   68.1M   3.58      17.31
"""

from resnext_jax.experiments import config_files
from resnext_jax.models import variants

default = config_files.sibling(__file__, "default")

MODELS = ("resnext29_8x64d", "resnext29_16x64d")
DATASETS = ("cifar10", "cifar100")


def get_config(arg="model=resnext29_8x64d,dataset=cifar10"):
    args = config_files.parse_family_args(
        arg,
        allowed={"model": MODELS, "dataset": DATASETS},
        defaults={"model": "resnext29_8x64d", "dataset": "cifar10"},
    )
    config = default.get_config()
    config.model = variants.model_config(
        args["model"], num_classes=100 if args["dataset"] == "cifar100" else 10, bn_group_size=16
    )
    config.dataset.name = args["dataset"]  # TFDS cifar10 / cifar100
    config.dataset.eval_split = "test"
    config.dataset.image_size = 32
    # fb.resnet.torch's CIFAR recipe: normalize with the training set's mean and std (the
    # dataset's default), zero-pad 4, random 32x32 crop, flip; no color jitter or lighting.
    config.dataset.augment = "pad_crop_flip"
    config.dataset.color_jitter = 0.0
    config.dataset.lighting = 0.0
    config.batch_size = 128
    config.eval_batch_size = 500
    config.num_epochs = 300
    config.learning_rate = 0.1
    config.lr_batch_size = 128
    config.weight_decay = 5e-4
    config.lr_drop_epochs = (150, 225)
    return config


def get_sweep():
    return [f"model={m},dataset={d}" for d in DATASETS for m in MODELS]
