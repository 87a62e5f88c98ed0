"""Every named variant builds with the paper's parameter counts; bad names get clear errors."""

import jax
import jax.numpy as jnp
import pytest

from resnext_jax.models import inspector, variants
from resnext_jax.models.resnet import group_width
from resnext_jax.models.variants import build_model, model_config
from tests.conftest import slow_unless

EXACT_PARAMS = {  # torchvision's counts for 1000 classes
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
}


@pytest.mark.parametrize(
    "name", slow_unless(EXACT_PARAMS, ("resnet18", "resnet50", "resnext50_32x4d"))
)
def test_exact_parameter_counts(name):
    assert inspector.param_count(build_model(name), (1, 224, 224, 3)) == EXACT_PARAMS[name]


# The rest in the full suite: every name builds the same way.
QUICK_VARIANTS = ("resnet50", "resnext50_32x4d", "resnext29_8x64d")


@pytest.mark.parametrize("name", slow_unless(variants.NAMED_VARIANTS, QUICK_VARIANTS))
def test_every_named_variant_builds(name):
    config = model_config(name)
    size = 224 if config.stem == "imagenet" else 32
    model = build_model(config)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, size, size, 3))))
    logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, size, size, 3))), variables)
    assert logits.shape == (2, config.num_classes)
    assert variants.variant_name(config) == name or name == "resnext101_1x100d"


def test_cifar_resnext29_params_match_table7():
    # Table 7 gives 34.4M and 68.1M parameters, to 0.1M.
    for name, published in (("resnext29_8x64d", 34.4e6), ("resnext29_16x64d", 68.1e6)):
        assert abs(inspector.param_count(build_model(name), (1, 32, 32, 3)) - published) < 0.1e6


def test_any_resnext_name_parses():
    config = model_config("resnext152_16x6d")
    assert (config.depth, config.cardinality, config.base_width) == (152, 16, 6)
    assert model_config("resnet101_1x100d").base_width == 100
    assert variants.conv2_width(model_config("resnext50_64x4d")) == 256


@pytest.mark.parametrize(
    "name,message",
    [
        ("resnet42", r"neither an ImageNet ResNet depth \[18, 34, 50, 101, 152, 200\]"),
        ("resnext77_32x4d", "nor a CIFAR ResNeXt depth 9n"),
        ("densenet121", "Named variants: resnet18"),
        ("resnext50", "needs its setting"),
        ("wide_resnet34_2", "depths 50 and 101"),
        ("resnext50_32x0d", "must be positive"),
    ],
)
def test_bad_names_list_what_is_allowed(name, message):
    with pytest.raises(ValueError, match=message):
        model_config(name)


def test_width_that_is_zero_names_the_minimum():
    with pytest.raises(ValueError, match="base_width must be at least 2"):
        model_config("resnext50_32x4d", planes=32, base_width=1)


def test_bad_settings():
    with pytest.raises(ValueError, match="basic blocks"):
        model_config("resnet18", cardinality=32)
    with pytest.raises(ValueError, match="model.stem='vit'"):
        model_config("resnet50", stem="vit")
    with pytest.raises(ValueError, match="set depth to match"):
        model_config("resnet50", stage_sizes=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="imagenet stem's strides are fixed"):
        model_config("resnet50", stem_strides=2)
    with pytest.raises(ValueError, match="stride >= 1"):
        model_config("resnext29_8x64d", stem_strides=0)


def test_groups_that_do_not_divide_the_width():
    from resnext_jax.ops.conv import Conv

    with pytest.raises(ValueError, match="3 groups must divide"):
        Conv(8, 3, groups=3).init(jax.random.key(0), jnp.zeros((1, 4, 4, 6)))


def test_group_width_rounds_down():
    """timm's floor(planes * d / 64), where rounding would give each group one more channel."""
    # planes * d / 64 = 1.75, 3.5, 7.0, 5.625, 0.875
    assert [group_width(p, d) for p, d in ((16, 7), (32, 7), (64, 7), (24, 15), (8, 7))] == [
        1, 3, 7, 5, 0
    ]  # fmt: skip
    config = model_config("_tiny_resnext", planes=16, base_width=7, cardinality=2)
    assert variants.conv2_width(config) == 2
    model = build_model(config)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    params = variables["params"]
    # (3, 3, d, C * d) per stage: floor(1.75) = 1 at 16 planes, floor(3.5) = 3 at 32.
    assert params["stage1_block0"]["conv2"]["kernel"].shape == (3, 3, 1, 2)
    assert params["stage2_block0"]["conv2"]["kernel"].shape == (3, 3, 3, 6)
