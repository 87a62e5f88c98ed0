"""Parameters, multiply-adds and conv2 group width of models, beside the paper's figures.

python scripts/model_stats.py                       # Table 1 and Table 3's 10 settings
python scripts/model_stats.py resnext101_64x4d configs/fashion_mnist.py --format=json
"""

import argparse
import json
import sys

from resnext_jax.experiments import config_files, paper
from resnext_jax.models import inspector, variants

COLUMNS = ("name", "params", "flops", "conv2_group_width")


def model_row(spec: str) -> dict:
    """Statistics of a variant name or a config file (`path.py[:args]`)."""
    if spec.partition(":")[0].endswith(".py"):
        config = config_files.load_config(spec)
        model_cfg, size = config.model, config.dataset.image_size
    else:
        model_cfg = variants.model_config(spec)
        size = 224 if model_cfg.stem == "imagenet" else 32
    name = variants.variant_name(model_cfg)
    model = variants.build_model(model_cfg)
    shape = (1, size, size, model_cfg.input_channels)
    row = dict(
        name=name,
        params=inspector.param_count(model, shape),
        flops=inspector.multiply_adds(model, shape),
        conv2_group_width=variants.conv2_width(model_cfg),
        image_size=size,
    )
    row.update({f"paper_{k}": v for k, v in paper.figures(name).items()})
    return row


def markdown(rows, title) -> str:
    header = ["model", "params (M)", "paper", "MACs (G)", "paper", "conv2 width", "paper",
              "paper top-1 err"]  # fmt: skip
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in rows:
        cells = [
            r["name"],
            f"{r['params'] / 1e6:.3f}",
            _fmt(r.get("paper_params"), 1e6, 3 if r.get("paper_params", 0) % 1e5 else 1),
            f"{r['flops'] / 1e9:.2f}",
            _fmt(r.get("paper_flops"), 1e9, 1),
            str(r["conv2_group_width"]),
            str(r.get("paper_conv2_group_width", "-")),
            str(r.get("paper_top1_error", "-")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value, scale, digits):
    return "-" if value is None else f"{value / scale:.{digits}f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="variant names or config files")
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown")
    args = parser.parse_args(argv)
    if args.models:
        groups = {"Models": [model_row(m) for m in args.models]}
    else:
        groups = {
            "Table 1 (224x224)": [model_row(n) for n in ("resnet50", "resnext50_32x4d")],
            "Table 3 settings at preserved complexity (224x224)": [
                model_row(f"{config_files.CONFIG_DIR / 'table3.py'}:{a}")
                for a in config_files.config_module("table3").get_sweep()
            ],
        }
    try:
        if args.format == "json":
            print(json.dumps([dict(r, table=t) for t, rows in groups.items() for r in rows]))
        else:
            print("\n\n".join(markdown(rows, title) for title, rows in groups.items()))
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
