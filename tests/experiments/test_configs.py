"""Every config loads locked, overrides work, misspellings and bad family arguments fail."""

import pathlib
import subprocess
import sys

import pytest

from resnext_jax.experiments import config_files
from resnext_jax.models import variants

CONFIGS = sorted(p for p in pathlib.Path("configs").glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_locked_and_builds(path):
    config = config_files.load_config(str(path))
    assert config.is_locked
    variants.validate(config.model)
    with pytest.raises(AttributeError):
        config.learning_rat = 0.2


def test_table3_family_and_sweep():
    table3 = config_files.config_module("table3")

    sweep = table3.get_sweep()
    assert len(sweep) == 10 and len(set(sweep)) == 10
    config = config_files.load_config("configs/table3.py:depth=101,cw=8x14d")
    assert (config.model.depth, config.model.cardinality, config.model.base_width) == (101, 8, 14)
    with pytest.raises(ValueError, match=r"choose one of \['1x64d', '2x40d'"):
        table3.get_config("depth=50,cw=16x4d")
    with pytest.raises(ValueError, match=r"keys \['depth', 'cw', 'recipe'\]"):
        table3.get_config("depht=50")
    with pytest.raises(ValueError, match=r"choose one of \[50, 101\]"):
        table3.get_config("depth=fifty")


def test_fmnist_table3_halves_the_papers_widths_at_preserved_complexity():
    fmnist_table3 = config_files.config_module("fmnist_table3")
    from resnext_jax.models import inspector

    sweep = fmnist_table3.get_sweep()
    assert sweep == [f"cw={cw}" for cw in ("1x64d", "2x40d", "4x24d", "8x14d", "32x4d")]
    configs = [config_files.load_config(f"configs/fmnist_table3.py:{arg}") for arg in sweep]
    # Table 2's conv2 widths (64, 80, 96, 112, 128), halved at 32 planes.
    assert [variants.conv2_width(c.model) for c in configs] == [32, 40, 48, 56, 64]
    macs = [inspector.multiply_adds(variants.build_model(c.model), (1, 28, 28, 1)) for c in configs]
    assert max(macs) / min(macs) < 1.06
    assert all(c.dataset.name == "fashion_mnist" for c in configs)


def test_named_config_matches_paper_setting():
    config = config_files.load_config("configs/resnext50_32x4d.py")
    assert variants.variant_name(config.model) == "resnext50_32x4d"
    assert config.batch_size == 256 and config.learning_rate == 0.1
    assert config.weight_decay == 1e-4 and config.momentum == 0.9
    assert tuple(config.lr_drop_epochs) == (30, 60, 90) and config.num_epochs == 100


_PRINT_CONFIG = """
import sys
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", lock_config=True)
flags.FLAGS(sys.argv)
print(flags.FLAGS.config.model.cardinality, flags.FLAGS.config.batch_size)
"""


def _run_with_flags(*argv):
    return subprocess.run([sys.executable, "-c", _PRINT_CONFIG, *argv], capture_output=True,
                          text=True)  # fmt: skip


@pytest.mark.slow
def test_command_line_overrides():
    done = _run_with_flags("--config=configs/resnext50_32x4d.py", "--config.model.cardinality=8",
                           "--config.batch_size=64")  # fmt: skip
    assert done.stdout.split() == ["8", "64"], done.stderr
    done = _run_with_flags("--config=configs/table3.py:depth=101,cw=8x14d",
                           "--config.model.cardinalty=8")  # fmt: skip
    assert done.returncode != 0 and 'Did you mean "cardinality"' in done.stderr


def test_default_workdir_is_derived_from_the_config_spec():
    assert config_files.default_workdir("configs/fashion_mnist.py") == "workdirs/fashion_mnist"
    spec = "configs/table3.py:depth=101,cw=8x14d"
    assert config_files.default_workdir(spec) == "workdirs/table3_depth-101_cw-8x14d"


def test_degradation_family_and_sweep():
    import jax
    import jax.numpy as jnp

    degradation = config_files.config_module("degradation")
    assert degradation.get_sweep() == [
        f"depth={d},net={n}" for n in ("plain", "resnet") for d in (8, 20, 32, 56)
    ]
    for arg in degradation.get_sweep():
        config = config_files.load_config(f"configs/degradation.py:{arg}")
        m = config.model
        n = (m.depth - 2) // 6
        assert tuple(m.stage_sizes) == (n, n, n) and m.depth == 6 * n + 2
        assert (m.block, m.stem, m.input_channels, m.num_classes) == ("basic", "cifar", 1, 10)
        assert m.shortcut == arg.endswith("resnet")
        assert config.dataset.name == "fashion_mnist" and config.nesterov is False
        assert tuple(config.lr_drop_epochs) == (config.num_epochs / 2, config.num_epochs * 0.75)
    with pytest.raises(ValueError, match=r"choose one of \[8, 14, 20, 32, 44, 56\]"):
        degradation.get_config("depth=26")
    with pytest.raises(ValueError, match=r"choose one of \['plain', 'resnet'\]"):
        degradation.get_config("net=residual")
    with pytest.raises(ValueError, match=r"keys \['depth', 'net'\]"):
        degradation.get_config("shortcut=false")

    # 6n+2 weighted layers: the stem's 3x3 conv, two 3x3 convs per block, the classifier;
    # the residual net adds 1x1 projections where the shape changes (stages 2 and 3).
    x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    for net, projections in (("plain", 0), ("resnet", 2)):
        model = variants.build_model(degradation.get_config(f"depth=56,net={net}").model)
        params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
        kernels = [(jax.tree_util.keystr(path), leaf.shape)
                   for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                   if path[-1].key == "kernel"]  # fmt: skip
        assert sum(shape[:2] == (3, 3) for _, shape in kernels) == 55
        assert sum(shape[:2] == (1, 1) for _, shape in kernels) == projections
        assert [shape for _, shape in kernels if len(shape) == 2] == [(64, 10)]


def test_table3_under_a_modern_recipe_and_the_rsb_procedures():
    config = config_files.load_config("configs/table3.py:depth=50,cw=4x24d,recipe=a3")
    assert (config.model.cardinality, config.model.base_width) == (4, 24)
    assert (config.optimizer, config.loss, config.learning_rate, config.num_epochs) == (
        "lamb", "bce", 8e-3, 100.0)  # fmt: skip
    assert (config.dataset.image_size, config.dataset.eval_image_size) == (160, 224)
    paper = config_files.load_config("configs/table3.py:depth=50,cw=4x24d")
    assert (paper.optimizer, paper.loss, paper.mixup_alpha) == ("sgd", "softmax", 0.0)
    a1 = config_files.load_config("configs/rsb_a1.py")
    assert (a1.model.drop_path_rate, a1.dataset.repeated_augmentation, a1.mixup_alpha) == (
        0.05, 3, 0.2)  # fmt: skip
    resnet = config_files.load_config("configs/rsb.py:procedure=a2,model=resnet50")
    assert (resnet.model.cardinality, resnet.weight_decay) == (1, 0.02)
    with pytest.raises(ValueError, match=r"choose one of \['a1', 'a2', 'a3'\]"):
        config_files.load_config("configs/rsb.py:procedure=a4")


def test_fashion_mnist_modern_ablation_changes_one_tool_per_setting():
    from resnext_jax.training import recipe

    family = config_files.config_module("fashion_mnist_modern")
    sweep = family.get_sweep()
    assert sweep[0] == "change=none" and len(sweep) == len(family.CHANGES)
    base = config_files.load_config("configs/fashion_mnist_modern.py")
    assert (base.model.planes, base.dataset.augment, base.dataset.random_erasing) == (
        64, "flip", 0.25)  # fmt: skip
    flat = recipe.flatten(base.to_dict())
    changed = {}
    for arg in sweep[1:]:
        config = config_files.load_config(f"configs/fashion_mnist_modern.py:{arg}")
        changed[arg] = sorted(recipe.differences(flat, recipe.flatten(config.to_dict())))
    assert changed == {
        "change=no_erasing": ["dataset.random_erasing"],
        "change=no_smoothing": ["label_smoothing"],
        "change=crop": ["dataset.augment"],
        "change=mixup": ["cutmix_alpha", "mix_prob", "mixup_alpha"],
        "change=randaugment": ["dataset.randaugment_m", "dataset.randaugment_n"],
        "change=drop_path": ["model.drop_path_rate"],
        "change=narrow": ["model.planes", "model.stem_width"],
        "change=adamw": ["learning_rate", "optimizer", "warmup_epochs", "weight_decay",
                         "weight_decay_on"],
        "change=lamb": ["learning_rate", "optimizer", "warmup_epochs", "weight_decay",
                        "weight_decay_on"],
        "change=bce": ["bce_target_threshold", "loss"],
        "change=repeated": ["dataset.repeated_augmentation"],
    }  # fmt: skip
    with pytest.raises(ValueError, match="choose one of"):
        config_files.load_config("configs/fashion_mnist_modern.py:change=dropout")
