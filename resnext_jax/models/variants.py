"""Model configs, named variants (`resnext50_32x4d`, ...), and building a model from either.

A model config is an ml_collections.ConfigDict of explicit fields (depth, cardinality,
base_width, ...); a name only fills those fields, so `--config.model.cardinality=8` can
change a named model without leaving a stale name behind.
"""

import re

import jax.numpy as jnp
import ml_collections

from resnext_jax.models.resnet import BLOCK_FORMS, ResNet, group_width
from resnext_jax.ops import conv

# Blocks per stage for the ImageNet networks (Table 1 of the paper; He et al. 2016).
IMAGENET_STAGES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}
BASIC_DEPTHS = (18, 34)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
STEMS = ("imagenet", "cifar")
BLOCKS = ("auto", "basic", "bottleneck")

# Small stand-ins for tests and examples; the leading underscore marks them as not the paper's.
TINY_VARIANTS = {
    "_tiny_basic": dict(
        block="basic",
        stage_sizes=(1, 1),
        depth=6,
        stem="cifar",
        stem_width=8,
        planes=8,
        num_classes=10,
    ),
    "_tiny_bottleneck": dict(
        stage_sizes=(1, 1), depth=8, stem="cifar", stem_width=8, planes=8, num_classes=10
    ),
    "_tiny_resnext": dict(
        stage_sizes=(1, 1),
        depth=8,
        stem="cifar",
        stem_width=8,
        planes=8,
        cardinality=4,
        base_width=16,
        num_classes=10,
    ),
    "_tiny_imagenet_resnext": dict(
        stage_sizes=(1, 1, 1, 1),
        depth=14,
        stem_width=8,
        planes=8,
        cardinality=4,
        base_width=16,
        num_classes=10,
    ),
}

# Every network the paper reports, by the names torchvision and timm use.
NAMED_VARIANTS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200",
    "resnext50_2x40d", "resnext50_4x24d", "resnext50_8x14d", "resnext50_32x4d",
    "resnext101_2x40d", "resnext101_4x24d", "resnext101_8x14d", "resnext101_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "resnext101_2x64d",
    "resnet101_1x100d", "wide_resnet50_2", "wide_resnet101_2",
    "resnext29_8x64d", "resnext29_16x64d",
)  # fmt: skip

_NAME_PATTERNS = (
    "resnet{depth}",
    "resnet{depth}_{C}x{d}d",
    "resnext{depth}_{C}x{d}d",
    "wide_resnet{50|101}_2",
)


def default_model_config() -> ml_collections.ConfigDict:
    """Every model field with its default (ResNet-50 on ImageNet)."""
    return ml_collections.ConfigDict(
        dict(
            depth=50,
            cardinality=1,  # C
            base_width=64,  # d: group width at 64 planes; floor(planes * d / 64) elsewhere
            block="auto",  # basic for depths 18 and 34, bottleneck otherwise
            stage_sizes=(),  # blocks per stage; () derives them from depth
            stem="imagenet",  # imagenet: 7x7/2 conv + 3x3/2 max pool; cifar: 3x3 conv
            stem_width=64,
            stem_strides=1,  # stride of the cifar stem's 3x3 conv (the imagenet stem is fixed)
            planes=64,  # planes of the first stage, doubled at each later stage
            num_classes=1000,
            input_channels=3,
            shortcut=True,  # False: Section 5.1's ablation without identity paths
            zero_init_last_bn=False,  # the paper initializes every BN scale to 1
            bn_momentum=0.9,  # running = momentum * running + (1 - momentum) * batch
            bn_epsilon=1e-5,
            bn_group_size=32,  # images per BN statistic: the paper's per-GPU batch
            dtype="float32",  # compute dtype; parameters stay float32
            conv_impl="auto",  # see resnext_jax.ops.conv.CHOICES
            form="grouped",  # Fig. 3 form of the aggregated transformation
            # Stochastic depth: the last block drops its residual branch with this probability
            # in training, earlier blocks linearly less (0: off).
            drop_path_rate=0.0,
        )
    )


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
    """The model config of a named variant, with `overrides` applied."""
    config = default_model_config()
    config.update(_parse_name(name))
    config.update(overrides)
    validate(config)
    return config


def _parse_name(name: str) -> dict:
    if name in TINY_VARIANTS:
        return dict(TINY_VARIANTS[name])
    if m := re.fullmatch(r"wide_resnet(\d+)_2", name):
        depth = int(m[1])
        if depth not in (50, 101):
            raise ValueError(f"{name}: wide ResNets exist at depths 50 and 101")
        return dict(depth=depth, base_width=128)
    if m := re.fullmatch(r"(resnet|resnext)(\d+)(?:_(\d+)x(\d+)d)?", name):
        depth = int(m[2])
        fields = dict(depth=depth)
        if m[3]:
            fields.update(cardinality=int(m[3]), base_width=int(m[4]))
        elif m[1] == "resnext":
            raise ValueError(f"{name}: a ResNeXt name needs its setting, e.g. resnext50_32x4d")
        if depth not in IMAGENET_STAGES:
            if (depth - 2) % 9 or depth < 11:
                raise ValueError(
                    f"{name}: depth {depth} is neither an ImageNet ResNet depth "
                    f"{sorted(IMAGENET_STAGES)} nor a CIFAR ResNeXt depth 9n+2 (11, 20, 29, ...)"
                )
            fields.update(stem="cifar", num_classes=10)
        return fields
    raise ValueError(
        f"unknown model {name!r}. Named variants: {', '.join(NAMED_VARIANTS)}. "
        f"Patterns: {', '.join(_NAME_PATTERNS)} (ImageNet depths {sorted(IMAGENET_STAGES)}; "
        f"CIFAR depths 9n+2, e.g. 29)."
    )


def stage_sizes(config) -> tuple[int, ...]:
    """Blocks per stage: explicit, from the ImageNet table, or 9n+2 -> (n, n, n) for CIFAR."""
    if config.stage_sizes:
        return tuple(config.stage_sizes)
    if config.stem == "imagenet":
        if config.depth not in IMAGENET_STAGES:
            raise ValueError(
                f"depth {config.depth} is not an ImageNet ResNet depth; "
                f"choose one of {sorted(IMAGENET_STAGES)}"
            )
        return IMAGENET_STAGES[config.depth]
    if (config.depth - 2) % 9 or config.depth < 11:
        raise ValueError(
            f"depth {config.depth} is not a CIFAR ResNeXt depth; choose 9n+2 (11, 20, 29, ...)"
        )
    return ((config.depth - 2) // 9,) * 3


def block_type(config) -> str:
    if config.block != "auto":
        return config.block
    return "basic" if config.stem == "imagenet" and config.depth in BASIC_DEPTHS else "bottleneck"


def validate(config) -> None:
    """Raise a ValueError that names the allowed values if `config` describes no valid model."""
    for field, allowed in (("stem", STEMS), ("block", BLOCKS), ("form", BLOCK_FORMS),
                           ("dtype", tuple(DTYPES)),
                           ("conv_impl", conv.CHOICES)):  # fmt: skip
        if config[field] not in allowed:
            raise ValueError(f"model.{field}={config[field]!r}; choose one of {allowed}")
    sizes = stage_sizes(config)
    block = block_type(config)
    layers = sum(sizes) * (2 if block == "basic" else 3) + 2
    if layers != config.depth:
        raise ValueError(
            f"model.depth={config.depth} but {block} blocks {sizes} make {layers} layers; "
            "set depth to match stage_sizes"
        )
    if not 0 <= config.get("drop_path_rate", 0.0) < 1:
        raise ValueError(f"model.drop_path_rate={config.drop_path_rate}; must be in [0, 1)")
    if config.cardinality < 1 or config.base_width < 1:
        raise ValueError("model.cardinality and model.base_width must be positive")
    if block == "basic" and (config.cardinality, config.base_width) != (1, 64):
        raise ValueError(
            f"basic blocks (depths {BASIC_DEPTHS}) have no cardinality or width setting; "
            "use a bottleneck depth (50, 101, 152, 200) for ResNeXt or wide variants"
        )
    if group_width(config.planes, config.base_width) < 1:
        raise ValueError(
            f"model.base_width={config.base_width} gives groups of width "
            f"floor({config.planes} * {config.base_width} / 64) = 0 at {config.planes} planes; "
            f"base_width must be at least {-(-64 // config.planes)}"
        )
    if config.stem_strides < 1 or (config.stem == "imagenet" and config.stem_strides != 1):
        raise ValueError(
            f"model.stem_strides={config.stem_strides}: the cifar stem takes a stride >= 1; "
            "the imagenet stem's strides are fixed (leave 1)"
        )
    if config.bn_group_size < 0:
        raise ValueError("model.bn_group_size must be >= 0 (0 normalizes over the whole batch)")


def variant_name(config) -> str:
    """The paper/torchvision-style name of a model config, e.g. resnext50_32x4d."""
    c, d, depth = config.cardinality, config.base_width, config.depth
    if c == 1 and d == 64:
        name = f"resnet{depth}"
    elif c == 1 and d == 128 and depth in (50, 101):
        name = f"wide_resnet{depth}_2"
    else:
        name = f"{'resnet' if c == 1 else 'resnext'}{depth}_{c}x{d}d"
    return name if config.shortcut else f"{name}_plain"


def conv2_width(config) -> int:
    """Width of the first stage's 3x3 conv (Table 2's 'width of group conv.' for conv2)."""
    if block_type(config) == "basic":
        return config.planes
    return group_width(config.planes, config.base_width) * config.cardinality


def build_model(config_or_name, **overrides) -> ResNet:
    """A ResNet module from a model config or a variant name."""
    if isinstance(config_or_name, str):
        config = model_config(config_or_name, **overrides)
    else:
        config = ml_collections.ConfigDict(config_or_name.to_dict())
        config.update(overrides)
        validate(config)
    return ResNet(
        stage_sizes=stage_sizes(config),
        block=block_type(config),
        cardinality=config.cardinality,
        base_width=config.base_width,
        num_classes=config.num_classes,
        stem=config.stem,
        stem_width=config.stem_width,
        stem_strides=config.stem_strides,
        planes=config.planes,
        shortcut=config.shortcut,
        zero_init_last_bn=config.zero_init_last_bn,
        bn_momentum=config.bn_momentum,
        bn_epsilon=config.bn_epsilon,
        bn_group_size=config.bn_group_size or None,
        dtype=DTYPES[config.dtype],
        conv_impl=config.conv_impl,
        form=config.form,
        drop_path_rate=config.get("drop_path_rate", 0.0),
    )
