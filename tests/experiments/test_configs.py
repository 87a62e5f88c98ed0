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
    with pytest.raises(ValueError, match=r"keys \['depth', 'cw'\]"):
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
