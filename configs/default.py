"""The paper's ImageNet recipe (Section 4 and the authors' fb.resnet.torch code), as base values.

Every other config starts from this one. Derived values (the learning rate for the actual
batch size, steps per epoch, the step at each lr drop) are computed by the trainer from
these, so a command-line override such as `--config.batch_size=64` never leaves them stale.
"""

import ml_collections

from resnext_jax import variants


def get_config():
    config = ml_collections.ConfigDict()
    config.model = variants.model_config("resnet50")

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "imagenet2012"
    config.dataset.data_dir = ""  # TFDS data dir ("" = TFDS's default)
    config.dataset.train_split = "train"
    config.dataset.eval_split = "validation"
    config.dataset.image_size = 224  # train crop and eval crop
    config.dataset.num_train_examples = 0  # 0: read from the data source
    config.dataset.num_eval_examples = 0

    # 256 images per step over 8 GPUs, 32 per GPU: model.bn_group_size keeps BN at 32 images.
    config.batch_size = 256  # global, over all devices and processes
    config.eval_batch_size = 256
    config.num_epochs = 100.0  # may be fractional (steps = round(epochs * steps per epoch))

    config.optimizer = "sgd"
    config.learning_rate = 0.1  # for every `lr_batch_size` images, scaled linearly
    config.lr_batch_size = 256
    config.momentum = 0.9
    config.nesterov = True  # fb.resnet.torch, which the paper's code builds on, uses Nesterov
    config.weight_decay = 1e-4
    config.weight_decay_on = "all"  # "all" parameters (the paper's code) or "kernels" only
    config.lr_schedule = "step"  # "step" or "cosine"
    config.lr_drop_epochs = (30, 60, 90)
    config.lr_drop_factor = 0.1
    config.warmup_epochs = 0.0
    config.label_smoothing = 0.0
    config.grad_clip_norm = 0.0  # 0: no clipping

    config.init_from = ""  # a variables checkpoint to fine-tune from (new head if needed)
    config.seed = 0
    config.log_every_steps = 100
    config.eval_every_epochs = 1
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.max_steps = 0  # > 0 stops after this many steps (smoke tests)
    return config
