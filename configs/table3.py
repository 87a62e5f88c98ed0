"""Table 3 of the paper: cardinality x bottleneck width at preserved complexity.

    python scripts/train.py --config=configs/table3.py:depth=101,cw=8x14d
    python scripts/train.py --config=configs/table3.py:depth=50,cw=4x24d,recipe=a2

Keys: depth (50 or 101), cw (1x64d, 2x40d, 4x24d, 8x14d, 32x4d) and recipe: `paper` (the
default: the paper's SGD recipe) or a "ResNet strikes back" procedure `a1`, `a2`, `a3`
(configs/rsb.py). `get_sweep()` lists all ten settings (`scripts/sweep.py
--config=configs/table3.py:recipe=a2` sweeps them under A2). The paper's
top-1 errors (ImageNet val, 224 crop):

    depth   1x64d  2x40d  4x24d  8x14d  32x4d
    50      23.9   23.0   22.6   22.3   22.2
    101     22.0   21.7   21.4   21.3   21.2
"""

from resnext_jax.experiments import config_files
from resnext_jax.models import variants

default = config_files.sibling(__file__, "default")
rsb = config_files.sibling(__file__, "rsb")

DEPTHS = (50, 101)
SETTINGS = ("1x64d", "2x40d", "4x24d", "8x14d", "32x4d")
RECIPES = ("paper", *rsb.PROCEDURES)


def get_config(arg="depth=50,cw=32x4d"):
    args = config_files.parse_family_args(
        arg,
        allowed={"depth": DEPTHS, "cw": SETTINGS, "recipe": RECIPES},
        defaults={"depth": 50, "cw": "32x4d", "recipe": "paper"},
    )
    config = default.get_config()
    config.model = variants.model_config(f"resnext{args['depth']}_{args['cw']}")
    if args["recipe"] != "paper":
        rsb.apply(config, args["recipe"])
    return config


def get_sweep():
    """Every setting of Table 3, as config arguments (scripts/sweep.py
    --config=configs/table3.py:recipe=a2 runs them all under a recipe)."""
    return [f"depth={depth},cw={cw}" for depth in DEPTHS for cw in SETTINGS]
