"""The "ResNet strikes back" procedures A1, A2 and A3 (Wightman, Touvron and Jegou 2021,
Table 1; timm's recipes), for ResNet-50 or any ResNeXt of this project, on ImageNet.

    python scripts/train.py --config=configs/rsb.py:procedure=a2,model=resnext50_32x4d
    python scripts/train.py --config=configs/rsb_a3.py      # the same, one file per procedure

Keys: procedure (a1, a2, a3) and model (a variant name). `apply(config, procedure)` puts a
procedure on another config; configs/table3.py uses it for "Table 3 under A2". Published
ImageNet top-1 accuracy (timm's results/results-imagenet.csv, at 224 px; error = 100 - it):

    procedure   epochs   ResNet-50   ResNeXt-50 32x4d
    A1          600      80.38       80.53
    A2          300      79.83       80.44
    A3          100      78.05       79.26

Settings shared by the three: global batch 2048, LAMB at lr 5e-3 (A3: 8e-3) with 5 warmup
epochs and a cosine to 1e-6, decoupled weight decay on conv and linear kernels only, binary
cross-entropy with targets thresholded at 0.2, Mixup (alpha 0.2 in A1, 0.1 in A2 and A3) and
CutMix (alpha 1.0) switched with probability 0.5, RandAugment with two ops at magnitude 7 (A3:
6) and std 0.5, random-resized crops and flips without color jitter or PCA lighting, and test
crops of 0.95 of the shorter side. A1 and A2 add stochastic depth 0.05 and repeated
augmentation (3 copies of each image); A1 label smoothing 0.1; A3 trains at 160 px and tests
at 224. The papers trained in mixed precision: add --config.model.dtype=bfloat16. BN
statistics come from groups of model.bn_group_size images (this project's 32).
"""

from resnext_jax.experiments import config_files
from resnext_jax.models import variants

default = config_files.sibling(__file__, "default")

PROCEDURES = ("a1", "a2", "a3")
# What differs between the procedures (Table 1 of the paper).
SETTINGS = {
    "a1": dict(num_epochs=600.0, learning_rate=5e-3, weight_decay=0.01, mixup_alpha=0.2,
               label_smoothing=0.1, drop_path_rate=0.05, repeats=3, randaugment_m=7.0,
               image_size=224),
    "a2": dict(num_epochs=300.0, learning_rate=5e-3, weight_decay=0.02, mixup_alpha=0.1,
               label_smoothing=0.0, drop_path_rate=0.05, repeats=3, randaugment_m=7.0,
               image_size=224),
    "a3": dict(num_epochs=100.0, learning_rate=8e-3, weight_decay=0.02, mixup_alpha=0.1,
               label_smoothing=0.0, drop_path_rate=0.0, repeats=1, randaugment_m=6.0,
               image_size=160),
}  # fmt: skip


def apply(config, procedure: str):
    """`config` (its model and dataset kept) trained under `procedure`; the same config."""
    if procedure not in SETTINGS:
        raise ValueError(f"procedure={procedure!r}; choose one of {list(PROCEDURES)}")
    s = SETTINGS[procedure]
    config.batch_size = 2048
    config.lr_batch_size = 2048
    config.learning_rate = s["learning_rate"]
    config.num_epochs = s["num_epochs"]
    config.optimizer = "lamb"
    config.adam_betas = (0.9, 0.999)
    config.adam_eps = 1e-6  # timm's Lamb
    config.weight_decay = s["weight_decay"]
    config.weight_decay_on = "kernels"
    config.lr_schedule = "cosine"
    config.warmup_epochs = 5.0
    config.lr_min = 1e-6
    config.loss = "bce"
    config.bce_target_threshold = 0.2
    config.label_smoothing = s["label_smoothing"]
    config.mixup_alpha = s["mixup_alpha"]
    config.cutmix_alpha = 1.0
    config.mix_prob = 1.0
    config.mix_switch_prob = 0.5
    config.model.drop_path_rate = s["drop_path_rate"]
    ds = config.dataset
    ds.image_size = s["image_size"]
    ds.eval_image_size = 224
    ds.eval_crop_fraction = 0.95
    ds.color_jitter = 0.0
    ds.lighting = 0.0
    ds.randaugment_n = 2
    ds.randaugment_m = s["randaugment_m"]
    ds.randaugment_mstd = 0.5
    ds.repeated_augmentation = s["repeats"]
    return config


def get_config(arg="procedure=a2,model=resnext50_32x4d"):
    args = config_files.parse_family_args(
        arg,
        allowed={"procedure": PROCEDURES, "model": variants.NAMED_VARIANTS},
        defaults={"procedure": "a2", "model": "resnext50_32x4d"},
    )
    config = default.get_config()
    config.model = variants.model_config(args["model"])
    return apply(config, args["procedure"])
