"""The degradation problem (He et al. 2016, Fig. 1 and Fig. 6): plain vs residual nets by depth.

    python scripts/sweep.py --config=configs/degradation.py --seeds=2 --run
    python scripts/report.py workdirs/sweeps/degradation --out=docs/results/degradation

One run: `python scripts/train.py --config=configs/degradation.py:depth=56,net=plain`.
Keys: depth (6n+2: 8, 14, 20, 32, 44, 56) and net (plain: no shortcuts, model.shortcut=False;
resnet: identity shortcuts, with a 1x1 projection (He et al.'s option B) at the two blocks
that change shape, where the paper's CIFAR nets pad with zeros (option A)). `get_sweep()`
lists depths 8, 20, 32 and 56 of both.

The networks are He et al.'s CIFAR ResNets: a 3x3 stem, then three stages of n basic blocks
each, planes doubled and the map halved per stage, global pooling and a linear classifier.
Here on Fashion-MNIST (28x28, one channel), at planes 16/32/64 (the paper's widths) after a
stride-2 stem to 14x14, so stages run at 14x14, 7x7, 4x4 and a run of the deepest net fits a
few CPU minutes. The recipe is the paper's CIFAR recipe (Section 4.2): SGD with momentum 0.9
(not Nesterov), weight decay 1e-4, lr 0.1 at batch 128 divided by 10 at 50% and 75% of
training, flips and 4-pixel pad-and-crop, BN over 64 images; only the length is cut: 8 epochs
of the first 20,000 training images (1250 steps; He et al.: 64k), so the 16 runs of the sweep
(2 seeds) fit about an hour of a 2-core CPU, one run at a time.

What the paper reports on CIFAR-10 (Fig. 6, in the figure only): plain-56 has higher training
and test error than plain-20 (the degradation problem: not overfitting, since training error
rises too), while ResNet-56 has lower error than ResNet-20. Table 6 gives the ResNets' test
errors: ResNet-20/32/44/56 8.75/7.51/7.17/6.97%.
`scripts/report.py` plots train and test error against depth and the Fig. 6 curves for such
a sweep.
"""

from resnext_jax.experiments import config_files
from resnext_jax.models import variants

default = config_files.sibling(__file__, "default")

DEPTHS = (8, 14, 20, 32, 44, 56)
NETS = ("plain", "resnet")
SWEEP_DEPTHS = (8, 20, 32, 56)
# Sized so that the sweep (4 depths x 2 nets x 2 seeds) trains in about an hour on 2 CPU cores.
NUM_TRAIN_EXAMPLES = 20_000
NUM_EPOCHS = 8


def model(depth: int, shortcut: bool):
    """He et al.'s CIFAR ResNet of `depth` = 6n+2 for one-channel 28x28 images."""
    n = (depth - 2) // 6
    config = variants.default_model_config()
    config.update(
        depth=depth,
        block="basic",
        stem="cifar",
        stage_sizes=(n, n, n),
        stem_width=16,
        stem_strides=2,
        planes=16,
        shortcut=shortcut,
        input_channels=1,
        num_classes=10,
        bn_group_size=64,  # He et al.: batch 128 on two GPUs
    )
    variants.validate(config)
    return config


def get_config(arg="depth=20,net=resnet"):
    args = config_files.parse_family_args(
        arg, allowed={"depth": DEPTHS, "net": NETS}, defaults={"depth": 20, "net": "resnet"}
    )
    config = default.get_config()
    config.model = model(args["depth"], shortcut=args["net"] == "resnet")
    config.dataset.name = "fashion_mnist"
    config.dataset.eval_split = "test"
    config.dataset.image_size = 28
    config.dataset.num_train_examples = NUM_TRAIN_EXAMPLES
    config.dataset.augment = "pad_crop_flip"  # one of in_memory.ARRAY_AUGMENTATIONS
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.num_epochs = NUM_EPOCHS
    config.learning_rate = 0.1
    config.lr_batch_size = 128
    config.nesterov = False
    config.weight_decay = 1e-4
    config.lr_schedule = "step"
    # At 50% and 75% of training, as He et al.'s 32k and 48k of 64k steps. Absolute epochs: an
    # override of num_epochs must give lr_drop_epochs too.
    config.lr_drop_epochs = (NUM_EPOCHS / 2, NUM_EPOCHS * 3 / 4)
    config.warmup_epochs = 0.0
    config.eval_every_epochs = 1.0
    config.checkpoint_every_steps = 500
    # Every epoch's checkpoint stays, for `scripts/analyze.py gradients` over training.
    config.keep_checkpoints = 12
    config.log_every_steps = 50
    return config


def get_sweep():
    """Depths 8, 20, 32 and 56, plain and residual."""
    return [f"depth={depth},net={net}" for net in NETS for depth in SWEEP_DEPTHS]
