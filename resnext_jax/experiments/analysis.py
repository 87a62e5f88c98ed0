"""Residual learning as experiments anyone can rerun: lesions, gradient norms, conv costs.

`lesion`: a trained run's eval error with each block's residual branch removed in turn
(Veit et al. 2016, "Residual Networks Behave Like Ensembles of Relatively Shallow
Networks"): an identity block passes its input on, a projection block keeps its projection,
a plain block becomes the identity where its shapes allow (resnext_jax/models/resnet.py).
`gradients`: the L2 norm of d loss / d (each block's input) and of each block's parameter
gradient, on one fixed training batch in train mode, at initialization and at each
checkpoint of a run; with identity shortcuts a^L = a^l + sum_i F(a^i), so the gradient
reaching block l carries the term d loss / d a^L unattenuated.
`conv_forms`: parameters, multiply-adds and (given a timer, resnext_jax/bench/conv.py's
`time_stacks`) the time of one kxk layer as dense, grouped, depthwise and depthwise-separable.
Each writes NAME.json, NAME.csv and NAME.png into an output folder (`write_outputs`).
"""

import csv
import dataclasses
import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from resnext_jax.data import sources
from resnext_jax.experiments import report
from resnext_jax.models import inspector, variants
from resnext_jax.models.resnet import block_specs
from resnext_jax.ops import conv as conv_ops
from resnext_jax.training import checkpoint, logs, loop, optim, recipe, steps

LESION_COLUMNS = ("block_index", "block", "downsamples", "projection", "removable", "reason",
                  "top1_error", "top5_error", "loss", "unlesioned_top1_error",
                  "unlesioned_top5_error", "unlesioned_loss")  # fmt: skip
GRADIENT_COLUMNS = ("model", "shortcut", "step", "block_index", "block", "input_grad_norm",
                    "param_grad_norm")  # fmt: skip
CONV_COLUMNS = ("form", "impl", "auto_impl", "params", "multiply_adds", "fwd_ms", "fwd_bwd_ms")
# The grouped-conv implementations `auto` may pick (conv_ops.select_impl never picks `dense`
# or `matmul`); `onednn` only where it is built.
AUTO_CANDIDATES = tuple(i for i in conv_ops.IMPLS if i not in ("dense", "matmul"))


def config_from_json(obj: dict) -> ml_collections.ConfigDict:
    """A config from its JSON form (config.json, results.json's "config"): lists back to the
    tuples every list-valued config field holds (stage_sizes, lr_drop_epochs, mean, ...)."""

    def tuples(value):
        if isinstance(value, dict):
            return {k: tuples(v) for k, v in value.items()}
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value

    return ml_collections.ConfigDict(tuples(obj))


def run_config(workdir) -> ml_collections.ConfigDict:
    """The config a workdir was trained under, from its config.json."""
    saved = recipe.saved_config(workdir)
    if saved is None:
        raise FileNotFoundError(f"no {logs.CONFIG_FILE} in {workdir}: not a training workdir")
    return config_from_json(saved)


def lesion(workdir) -> dict:
    """The eval error of a run's latest checkpoint with each block's residual branch removed."""
    config = run_config(workdir)
    run, variables = loop.load_for_eval(config, workdir=workdir)
    with checkpoint.checkpoint_manager(workdir, config) as manager:
        step = manager.latest_step()
    base = steps.evaluate(run, variables)
    rows = []
    for spec in block_specs(run.model):
        row = {"block_index": spec.index, "block": spec.name, "downsamples": spec.strides != 1,
               "projection": spec.shortcut and spec.changes_shape, "removable": spec.removable,
               "reason": "", "top1_error": None, "top5_error": None, "loss": None}  # fmt: skip
        if spec.removable:
            lesioned = dataclasses.replace(run, model=run.model.clone(lesioned=(spec.name,)))
            result = steps.evaluate(lesioned, variables)
            row.update({k: result[k] for k in ("top1_error", "top5_error", "loss")})
        else:
            row["reason"] = (
                f"plain block from {spec.in_features} to {spec.out_features} channels at "
                f"stride {spec.strides}: no identity to fall back on"
            )
        rows.append(
            row | {f"unlesioned_{k}": base[k] for k in ("top1_error", "top5_error", "loss")}
        )
    return {"workdir": str(workdir), "model": variants.variant_name(config.model),
            "shortcut": config.model.shortcut, "step": step, "examples": base["examples"],
            "unlesioned": {k: base[k] for k in ("top1_error", "top5_error", "loss")},
            "rows": rows}  # fmt: skip


def first_batch(config, batch_size) -> dict:
    """The first training batch of seed 0 (augmented as in training), on the host."""
    source = sources.get_source(config)
    batch = next(source.train_batches(batch_size, 0))
    return {"image": jnp.asarray(batch["image"]), "label": jnp.asarray(batch["label"])}


def gradient_norms(model, variables, batch, label_smoothing=0.0) -> list[dict]:
    """Per block of `model`: the L2 norms of d loss / d (block input) and of d loss / d (block
    parameters), for the batch's mean training loss in train mode (batch statistics)."""
    image, label = batch["image"], batch["label"]
    # Zeros of every block input's shape: `ResNet` adds them to the inputs (`perturb`).
    shapes = jax.eval_shape(
        lambda v: model.apply(v, image, train=True, mutable=["perturbations", "batch_stats"]),
        variables,
    )[1]["perturbations"]
    perturbations = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    grads = _grads(model, variables["params"], variables["batch_stats"], perturbations, image,
                   label, label_smoothing)  # fmt: skip
    return [
        {"block_index": spec.index, "block": spec.name,
         "input_grad_norm": float(optax.tree.norm(grads[1][f"{spec.name}_input"])),
         "param_grad_norm": float(optax.tree.norm(grads[0][spec.name]))}
        for spec in block_specs(model)
    ]  # fmt: skip


@functools.partial(jax.jit, static_argnames=("model", "label_smoothing"))
def _grads(model, params, batch_stats, perturbations, image, label, label_smoothing):
    """(d loss / d params, d loss / d block inputs): compiled once per model, for every step."""

    def loss_fn(params, perturbations):
        variables = {"params": params, "batch_stats": batch_stats, "perturbations": perturbations}
        logits, _ = model.apply(variables, image, train=True, mutable=["batch_stats"])
        return steps.cross_entropy(logits, label, logits.shape[-1], label_smoothing).mean()

    return jax.grad(loss_fn, argnums=(0, 1))(params, perturbations)


def gradients(config, workdir=None, batch_size=128, label=None) -> list[dict]:
    """`gradient_norms` of `config`'s model at initialization (step 0, from config.seed) and,
    with `workdir`, at each of its checkpoints; rows of GRADIENT_COLUMNS."""
    run = steps.build_run(config)
    tx = optim.create_optimizer(config, max(1, run.source.num_train // config.batch_size))
    state = steps.create_train_state(run, tx, jax.random.key(config.seed))
    states = {0: state}
    if workdir is not None:
        with checkpoint.checkpoint_manager(workdir, config) as manager:
            if not manager.all_steps():
                raise FileNotFoundError(f"no checkpoint in {manager.directory}")
            for step in manager.all_steps():
                states[step] = checkpoint.restore_latest(manager, state, step)[0]
    model = variants.build_model(config.model)  # one host batch, no device axis
    batch = first_batch(config, batch_size)
    label = label or variants.variant_name(config.model)
    rows = []
    for step, s in sorted(states.items()):
        variables = {"params": s.params, "batch_stats": s.batch_stats}
        for row in gradient_norms(model, variables, batch, config.label_smoothing):
            rows.append({"model": label, "shortcut": config.model.shortcut, "step": step, **row})
    return rows


def _conv_stacks(height, width, channels, out_channels, kernel, groups) -> dict:
    """{form: nn.Module} of the four forms of one kxk layer."""

    def layers(*convs):
        return nn.Sequential([conv_ops.Conv(f, k, groups=g) for f, k, g in convs])

    return {
        "dense": layers((out_channels, kernel, 1)),
        f"grouped (g={groups})": layers((out_channels, kernel, groups)),
        "depthwise": layers((channels, kernel, channels)),
        "depthwise-separable": layers((channels, kernel, channels), (out_channels, 1, 1)),
    }


def conv_forms(height=28, width=28, channels=32, out_channels=32, kernel=3, groups=8,
               batch=32, timer=None, reps=5) -> list[dict]:  # fmt: skip
    """Rows of CONV_COLUMNS: one kxk layer as dense, grouped, depthwise and depthwise-separable
    (depthwise kxk, then 1x1), with parameters (no bias) and multiply-adds per image counted
    from the layers; with `timer` (resnext_jax.bench.conv.time_stacks) one row per grouped-conv
    implementation `auto` can choose, timed side by side at `batch` images."""
    shape = (batch, height, width, channels)
    rows, stacks = [], {}
    candidates = [i for i in AUTO_CANDIDATES if i != "onednn" or conv_ops.onednn_usable()]
    for form, module in _conv_stacks(height, width, channels, out_channels, kernel,
                                     groups).items():  # fmt: skip
        calls = inspector.layers(module, shape)[0]
        grouped = any(c.module.groups > 1 for c in calls)
        auto = "+".join(
            conv_ops.select_impl(c.in_shape, (c.module.kernel_size,) * 2
                                 + (c.in_shape[-1] // c.module.groups, c.module.features),
                                 1, c.module.groups)
            for c in calls
        )  # fmt: skip
        count = {"params": inspector.param_count(module, shape),
                 "multiply_adds": inspector.multiply_adds(module, shape)}  # fmt: skip
        for impl in candidates if grouped and timer else ["auto"]:
            rows.append({"form": form, "impl": impl, "auto_impl": auto, **count,
                         "fwd_ms": None, "fwd_bwd_ms": None})  # fmt: skip
            stacks[form, impl] = [
                (impl if c.module.groups > 1 else "auto", c.in_shape, c.module.kernel_size,
                 c.module.groups, c.module.features)
                for c in calls
            ]  # fmt: skip
    if timer is not None:
        times = timer(stacks, reps)
        for row in rows:
            ms = times[row["form"], row["impl"]]
            row.update(fwd_ms=ms["fwd"], fwd_bwd_ms=ms["fwd+bwd"])
    return rows


def markdown_table(rows, columns) -> str:
    """A markdown table of `rows`' `columns` (floats to 3 decimals, None blank)."""

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3f}"
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_outputs(out_dir, name, payload, rows, columns) -> dict[str, pathlib.Path]:
    """NAME.json (`payload`) and NAME.csv (`rows`' `columns`) in `out_dir`; their paths."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "csv": out_dir / f"{name}.csv"}
    logs.write_json(paths["json"], payload)
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return paths


def plot_lesion(result, path) -> pathlib.Path:
    """Top-1 error against the removed block, the unlesioned error as a line."""
    plt = report.pyplot()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.35 * len(rows)), 4.4))
    ax.axhline(result["unlesioned"]["top1_error"], color="gray", ls="--", label="no block removed")
    kept = [r for r in rows if r["top1_error"] is not None]
    ax.plot([r["block_index"] for r in kept], [r["top1_error"] for r in kept], marker="o",
            label="one block's residual branch removed")  # fmt: skip
    down = [r for r in kept if r["downsamples"]]
    ax.scatter([r["block_index"] for r in down], [r["top1_error"] for r in down], s=120,
               facecolors="none", edgecolors="red", zorder=3,
               label="downsampling block")  # fmt: skip
    for r in rows:
        if not r["removable"]:
            ax.axvline(r["block_index"], color="red", alpha=0.3, lw=6)
    ax.set_xticks([r["block_index"] for r in rows], [r["block"] for r in rows], rotation=90,
                  fontsize="small")  # fmt: skip
    ax.set_ylabel("top-1 eval error (%)")
    kind = "residual" if result["shortcut"] else "plain (shaded: not removable)"
    ax.set_title(f"{result['model']} ({kind}), step {result['step']}: lesion study")
    ax.legend(fontsize="small")
    return report.save_figure(fig, path)


def plot_gradients(result, path) -> pathlib.Path:
    """Gradient norms against block index, log y: residual solid, plain dashed, a color per
    checkpoint step; block inputs on the left, block parameters on the right."""
    plt, rows = report.pyplot(), result["rows"]
    stepnums = sorted({r["step"] for r in rows})
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for (model, step), group in _groups(rows).items():
        color = cmap(stepnums.index(step) / max(1, len(stepnums) - 1))
        ls = "-" if group[0]["shortcut"] else "--"
        for ax, key in zip(axes, ("input_grad_norm", "param_grad_norm"), strict=True):
            ax.plot([r["block_index"] for r in group], [r[key] for r in group], color=color,
                    ls=ls, marker=".", label=f"{model}, step {step}")  # fmt: skip
    for ax, what in zip(axes, ("d loss / d block input", "d loss / d block params"), strict=True):
        ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("block index (0: nearest the input)")
        ax.set_ylabel(f"L2 norm of {what}")
    axes[1].legend(fontsize="x-small")
    fig.suptitle("gradient norms by depth: residual solid, plain dashed")
    return report.save_figure(fig, path)


def _groups(rows) -> dict:
    out = {}
    for r in rows:
        out.setdefault((r["model"], r["step"]), []).append(r)
    return out


def plot_convs(result, path) -> pathlib.Path:
    """Parameters, multiply-adds and fwd+bwd time of each form, as bars."""
    plt, rows = report.pyplot(), result["rows"]
    forms = list(dict.fromkeys(r["form"] for r in rows))
    first = {f: next(r for r in rows if r["form"] == f) for f in forms}
    timed = [r for r in rows if r["fwd_bwd_ms"] is not None]
    fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(13 if timed else 9, 4.4))
    for ax, key in zip(axes, ("params", "multiply_adds"), strict=False):
        ax.bar(range(len(forms)), [first[f][key] for f in forms])
        ax.set_xticks(range(len(forms)), forms, rotation=20, fontsize="small")
        ax.set_ylabel(key.replace("_", "-"))
        ax.set_yscale("log")
    if timed:
        ax = axes[2]
        ax.bar(range(len(timed)), [r["fwd_bwd_ms"] for r in timed])
        ax.set_xticks(range(len(timed)), [f"{r['form']}\n{r['impl']}" for r in timed],
                      rotation=90, fontsize="x-small")  # fmt: skip
        ax.set_ylabel(f"fwd+bwd ms on {jax.default_backend()} (median)")
    fig.suptitle("one conv layer: dense, grouped, depthwise, depthwise-separable")
    return report.save_figure(fig, path)
