"""The paper's ImageNet recipe (Section 4 and the authors' fb.resnet.torch code), as base values.

Every other config starts from this one. Derived values (the learning rate for the actual
batch size, steps per epoch, the step at each lr drop) are computed by the trainer from
these, so a command-line override such as `--config.batch_size=64` never leaves them stale.
"""

import ml_collections

from resnext_jax.models import variants


def get_config():
    config = ml_collections.ConfigDict()
    config.model = variants.model_config("resnet50")

    # The data (README "Data"): a TFDS name (prepared as array_record), "image_folder",
    # "fashion_mnist" or "synthetic". Preprocessing defaults are the paper's ImageNet recipe
    # (fb.resnet.torch); resnext_jax/data/preprocessing.py describes each step.
    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "imagenet2012"
    config.dataset.data_dir = ""  # TFDS data dir ("" = TFDS's default); image_folder: its root
    config.dataset.train_split = "train"  # TFDS split (slices too: "train[:90%]"); or subfolder
    config.dataset.eval_split = "validation"
    config.dataset.image_size = 224  # train crop (and eval crop unless eval_image_size is set)
    config.dataset.num_train_examples = 0  # 0: read from the data source
    config.dataset.num_eval_examples = 0
    # "" = the dataset's own: random_resized_crop for ImageNet-like images, pad_crop_flip for
    # CIFAR and other images of at most 64 pixels; or flip, none
    # (preprocessing.IMAGE_AUGMENTATIONS; Fashion-MNIST: in_memory.ARRAY_AUGMENTATIONS).
    config.dataset.augment = ""
    config.dataset.crop_area_range = (0.08, 1.0)  # random_resized_crop: fraction of the area
    config.dataset.crop_aspect_range = (3 / 4, 4 / 3)  # random_resized_crop: width / height
    config.dataset.flip = True  # random_resized_crop: horizontal flips
    config.dataset.crop_padding = 4  # pad_crop_flip: zero padding before the random crop
    config.dataset.color_jitter = 0.4  # brightness, contrast, saturation in 1 +- this; 0: off
    config.dataset.lighting = 0.1  # std of AlexNet-style PCA lighting noise; 0: off
    config.dataset.mean = ()  # per channel, on [0, 1]; () = the dataset's (ImageNet's, CIFAR's)
    config.dataset.std = ()
    config.dataset.interpolation = "bicubic"  # resizing (fb.resnet.torch's), or "bilinear"
    config.dataset.eval_image_size = 0  # eval center crop; 0: image_size (Table 5 tests at 320)
    # random_resized_crop: eval crop / shorter side it is taken from: 224 of 256. 1.0 resizes
    # the shorter side to the crop (e.g. 320 of 320).
    config.dataset.eval_crop_fraction = 0.875
    config.dataset.jpeg_draft = True  # decode JPEGs at 1/2, 1/4, 1/8 scale when a crop allows
    config.dataset.image_key = ""  # TFDS feature names; "" = the dataset's supervised keys
    config.dataset.label_key = ""
    config.dataset.workers = 0  # decoding threads per process; 0: one per CPU core
    # An undecodable image or a label out of range: "error" stops and names it; "skip" uses
    # the next good example in its place (README "Failure and recovery").
    config.dataset.bad_examples = "error"
    # Modern recipes (README "Modern recipes"), all off by default. RandAugment: `n` ops per
    # training image at magnitude `m` (0-10, timm's scale) with noise of std `mstd`; 0: off.
    config.dataset.randaugment_n = 0
    config.dataset.randaugment_m = 9.0
    config.dataset.randaugment_mstd = 0.0
    config.dataset.random_erasing = 0.0  # probability of erasing a random box of a train image
    # Repeated augmentation: each image `k` times per global batch, differently augmented.
    config.dataset.repeated_augmentation = 1

    # 256 images per step over 8 GPUs, 32 per GPU: model.bn_group_size keeps BN at 32 images.
    config.batch_size = 256  # global, over all devices and processes
    config.eval_batch_size = 256
    # Test-time flip: evaluate each image and its mirror image, averaging the class probabilities.
    config.eval_flip = False
    config.num_epochs = 100.0  # may be fractional (steps = round(epochs * steps per epoch))

    config.optimizer = "sgd"  # "sgd" (the paper's), "adamw" or "lamb"
    config.learning_rate = 0.1  # for every `lr_batch_size` images, scaled linearly
    config.lr_batch_size = 256
    config.momentum = 0.9
    config.nesterov = True  # fb.resnet.torch, which the paper's code builds on, uses Nesterov
    config.adam_betas = (0.9, 0.999)  # adamw and lamb
    config.adam_eps = 1e-8
    # sgd: L2 added to the gradient (the paper's code); adamw and lamb: decoupled decay.
    config.weight_decay = 1e-4
    config.weight_decay_on = "all"  # "all" parameters (the paper's code) or "kernels" only
    config.lr_schedule = "step"  # "step" or "cosine"
    config.lr_drop_epochs = (30, 60, 90)
    config.lr_drop_factor = 0.1
    config.lr_min = 0.0  # cosine: the floor the learning rate decays to
    config.warmup_epochs = 0.0
    config.label_smoothing = 0.0
    config.grad_clip_norm = 0.0  # 0: no clipping
    # "softmax" cross-entropy, or "bce": binary cross-entropy on one-hot (or mixed) targets,
    # each target set to 1 where it exceeds `bce_target_threshold` (timm's; 0: off).
    config.loss = "softmax"
    config.bce_target_threshold = 0.0
    # Mixup and CutMix of the global batch (0: off), per step with probability `mix_prob`,
    # CutMix instead of Mixup with probability `mix_switch_prob` when both are on.
    config.mixup_alpha = 0.0
    config.cutmix_alpha = 0.0
    config.mix_prob = 1.0
    config.mix_switch_prob = 0.5
    # An exponential moving average of the parameters and BN statistics, evaluated beside the
    # raw ones; 0: off (e.g. 0.9998 for ImageNet at batch 1024).
    config.ema_decay = 0.0

    config.init_from = ""  # a variables checkpoint to fine-tune from (new head if needed)
    config.seed = 0
    config.log_every_steps = 100
    config.eval_every_epochs = 1.0  # may be fractional
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.max_steps = 0  # > 0 stops after this many steps (smoke tests)
    return config
