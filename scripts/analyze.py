"""Residual-learning experiments: lesions, gradient norms by depth, conv forms' costs.

    python scripts/analyze.py lesion --workdir=DIR [--out=DIR/analysis]
    python scripts/analyze.py gradients --config=configs/degradation.py:depth=56,net=resnet \
        --workdir=RESNET_DIR --config=configs/degradation.py:depth=56,net=plain \
        --workdir=PLAIN_DIR [--batch_size=128] [--out=analysis]
    python scripts/analyze.py convs [--height=28 --width=28 --channels=32 --out_channels=32 \
        --kernel=3 --groups=8 --batch=32 --reps=5] [--out=analysis]

Each writes NAME.json, NAME.csv and NAME.png (lesion, gradients, convs) into --out (default:
the first workdir's analysis/ folder, else ./analysis). `gradients` takes --config once per
model; each --workdir belongs to the --config at the same position (one for each, or none:
initialization only). resnext_jax/experiments/analysis.py says what each measures.
"""

import argparse
import pathlib
import sys

from resnext_jax.devices import runtime

CONV_SIZES = {"height": 28, "width": 28, "channels": 32, "out_channels": 32, "kernel": 3,
              "groups": 8, "batch": 32, "reps": 5}  # fmt: skip


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    lesion = commands.add_parser("lesion", help="eval error with each block's branch removed")
    lesion.add_argument("--workdir", required=True, help="a training workdir with checkpoints")
    grads = commands.add_parser("gradients", help="gradient norms per block and checkpoint")
    grads.add_argument("--config", action="append", required=True, help="config file[:args]")
    grads.add_argument("--workdir", action="append", default=[], help="that config's run")
    grads.add_argument("--batch_size", type=int, default=128)
    convs = commands.add_parser("convs", help="a kxk layer: dense, grouped, depthwise, separable")
    for name, default in CONV_SIZES.items():
        convs.add_argument(f"--{name}", type=int, default=default)
    for command in (lesion, grads, convs):
        command.add_argument("--out", help="output folder")
    args = parser.parse_args(argv)
    if args.command == "gradients" and args.workdir and len(args.workdir) != len(args.config):
        parser.error("give one --workdir per --config, in the same order, or none")
    return args


def compute(args):
    """(result, CSV columns, plot function) of the subcommand."""
    from resnext_jax.experiments import analysis, config_files

    if args.command == "lesion":
        return analysis.lesion(args.workdir), analysis.LESION_COLUMNS, analysis.plot_lesion
    if args.command == "gradients":
        rows = []
        for spec, workdir in zip(
            args.config, args.workdir or [None] * len(args.config), strict=True
        ):
            config = config_files.load_config(spec)
            rows += analysis.gradients(config, workdir, args.batch_size, label=spec)
        return {"rows": rows}, analysis.GRADIENT_COLUMNS, analysis.plot_gradients
    from resnext_jax.bench import conv as bench_conv

    sizes = {k: getattr(args, k) for k in CONV_SIZES}
    rows = analysis.conv_forms(**sizes, timer=bench_conv.time_stacks)
    return {**sizes, "rows": rows}, analysis.CONV_COLUMNS, analysis.plot_convs


def main(argv=None):
    args = parse(argv)
    from resnext_jax.experiments import analysis

    workdirs = [args.workdir] if args.command == "lesion" else getattr(args, "workdir", [])
    out = pathlib.Path(args.out or (pathlib.Path(workdirs[0]) / "analysis" if workdirs
                                    else "analysis"))  # fmt: skip
    try:
        result, columns, plot = compute(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    paths = analysis.write_outputs(out, args.command, result, result["rows"], columns)
    paths["png"] = plot(result, out / f"{args.command}.png")
    if "unlesioned" in result:
        print(f"{result['model']} at step {result['step']}: unlesioned top-1 error "
              f"{result['unlesioned']['top1_error']:.2f}%")  # fmt: skip
    print(analysis.markdown_table(result["rows"], columns))
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    runtime.use_tcmalloc()
    main()
