"""Convert torchvision (or timm) ResNet/ResNeXt weights to a variables checkpoint, and back.

python scripts/convert_torchvision.py --model=resnext50_32x4d \
    --weights=resnext50_32x4d-7cdf4587.pth --out=checkpoints/resnext50_32x4d --verify
python scripts/convert_torchvision.py --reverse --checkpoint=checkpoints/resnext50_32x4d \
    --out=resnext50_32x4d.pth --verify

--verify runs torchvision's model of the same name and ours, both in eval mode, on a fixed
random batch before anything is written, and exits 1, writing nothing, if any logit differs
by more than 1e-4. A state_dict that does not fit the model, a file that is not a state_dict
or that torch cannot read (truncated, corrupt), or an output that cannot be written exits 2;
a failed write leaves nothing behind. torch and torchvision come with
`bash scripts/setup.sh --test` (requirements-test.txt).
"""

import argparse
import sys

from resnext_jax.models import interop, variants
from resnext_jax.training import checkpoint


def verify(state_dict, variables, config, image_size: int) -> bool:
    """Whether torchvision's model holding `state_dict` and ours holding `variables` agree."""
    diff, scale = interop.verify_logits(state_dict, variables, config, image_size)
    ok = diff <= interop.VERIFY_TOLERANCE
    print(
        f"verify: max |logit difference| from torchvision's {variants.variant_name(config)} "
        f"on 2x3x{image_size}x{image_size} random images: {diff:.3g} "
        f"({'within' if ok else 'ABOVE'} {interop.VERIFY_TOLERANCE:g}; max |logit| {scale:.3g})"
    )
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="variant name as torchvision spells it, e.g. resnet50")
    parser.add_argument("--weights", help=".pth file holding the model's state_dict")
    parser.add_argument("--out", required=True, help="checkpoint folder (--reverse: .pth file)")
    parser.add_argument(
        "--num_classes", type=int, help="head size (default: the rows of the state_dict's fc)"
    )
    parser.add_argument("--reverse", action="store_true", help="export a checkpoint as a .pth")
    parser.add_argument("--checkpoint", help="with --reverse: the checkpoint folder to export")
    parser.add_argument("--verify", action="store_true", help="compare logits with torchvision")
    parser.add_argument("--image_size", type=int, default=224, help="--verify's image size")
    args = parser.parse_args(argv)
    if args.reverse and not args.checkpoint:
        parser.error("--reverse needs --checkpoint=DIR")
    if not args.reverse and not (args.model and args.weights):
        parser.error("converting needs --model=NAME and --weights=FILE.pth (or use --reverse)")

    try:
        if args.reverse:
            variables, config = checkpoint.load_variables(args.checkpoint)
            state_dict = interop.to_torchvision(variables, config)
        else:
            state_dict = interop.load_state_dict(args.weights)
            num_classes = args.num_classes
            if num_classes is None:
                num_classes = (
                    state_dict["fc.weight"].shape[0] if "fc.weight" in state_dict else 1000
                )
            config = variants.model_config(args.model, num_classes=num_classes)
            variables = interop.from_torchvision(state_dict, config)
        if args.verify and not verify(state_dict, variables, config, args.image_size):
            print(f"convert_torchvision: verification failed; {args.out} not written",
                  file=sys.stderr)  # fmt: skip
            return 1
        with interop.removed_on_failure(args.out):
            if args.reverse:
                interop.save_state_dict(state_dict, args.out)
                what = f"torchvision state_dict of {variants.variant_name(config)}"
            else:
                checkpoint.save_variables(args.out, variables, config)
                what = f"{args.model} with {config.num_classes} classes"
        print(f"wrote {args.out}: {what}")
    except (ValueError, OSError) as e:  # OSError: FileNotFoundError, FileExistsError, ...
        print(f"convert_torchvision: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
