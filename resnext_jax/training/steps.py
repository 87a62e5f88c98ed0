"""What one training or evaluation step computes, compiled over the run's device mesh.

Data parallel over every device of every process: one mesh axis "data", the global batch
split along it, the train state replicated, and each step one program per device with its
reductions written out (resnext_jax/devices/parallel.py). The same code runs on one CPU and
on a pod. The trainer (resnext_jax/training/loop.py), `scripts/eval.py` and the model
benchmark (resnext_jax/bench/models.py) all compile their steps here.
"""

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from resnext_jax.data import base, sources
from resnext_jax.devices import parallel, runtime
from resnext_jax.devices.parallel import DATA_AXIS
from resnext_jax.models import variants
from resnext_jax.training import mixing


class TrainState(train_state.TrainState):
    batch_stats: Any
    # With config.ema_decay: {"params", "batch_stats"}, the moving average of both; else None.
    ema: Any = None


LOSSES = ("softmax", "bce")


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What a training step does besides the update: its loss, its batch mixing, its EMA.

    Built from the config (`from_config`); static for the compiled step. Random draws (mixing,
    stochastic depth) come from (seed, step) alone, the same on every device and process.
    """

    label_smoothing: float = 0.0
    loss: str = "softmax"  # LOSSES
    bce_target_threshold: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    ema_decay: float = 0.0
    seed: int = 0

    @classmethod
    def from_config(cls, config):
        get = config.get
        return cls(
            label_smoothing=config.label_smoothing,
            loss=get("loss", "softmax"),
            bce_target_threshold=get("bce_target_threshold", 0.0),
            mixup_alpha=get("mixup_alpha", 0.0),
            cutmix_alpha=get("cutmix_alpha", 0.0),
            mix_prob=get("mix_prob", 1.0),
            mix_switch_prob=get("mix_switch_prob", 0.5),
            ema_decay=get("ema_decay", 0.0),
            seed=config.seed,
        )

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


@dataclasses.dataclass
class Run:
    """What a run is built from; shared by training and `scripts/eval.py`."""

    config: ml_collections.ConfigDict
    model: Any
    source: Any
    mesh: Mesh

    @property
    def replicated(self):
        return parallel.replicated(self.mesh)

    @property
    def data_sharding(self):
        return parallel.data_sharded(self.mesh)

    def global_batch(self, local: dict) -> dict:
        """Assemble each process's numpy rows into one array sharded over the mesh (leaving
        out the host-side count "skipped" of resnext_jax/data/base.py)."""
        return {
            k: jax.make_array_from_process_local_data(self.data_sharding, v)
            for k, v in local.items()
            if k != "skipped"
        }


def build_run(config, devices=None) -> Run:
    """Check the config against the data and the devices; clear errors before any compute.

    `devices` (default: every device of every process) are the mesh the run's steps use.
    """
    variants.validate(config.model)
    source = sources.get_source(config)
    channels = source.image_shape[-1]
    if config.model.input_channels != channels:
        raise ValueError(
            f"model.input_channels={config.model.input_channels} but {config.dataset.name} "
            f"images have {channels}; set --config.model.input_channels={channels}"
        )
    if config.model.num_classes != source.num_classes:
        raise ValueError(
            f"model.num_classes={config.model.num_classes} but {config.dataset.name} has "
            f"{source.num_classes} classes; set --config.model.num_classes={source.num_classes}"
        )
    group = config.model.bn_group_size
    if group and config.batch_size > group and config.batch_size % group:
        raise ValueError(
            f"batch_size={config.batch_size} is not a multiple of model.bn_group_size={group} "
            "(the images each BN statistic is computed over)"
        )
    mesh = parallel.make_mesh(devices)
    devices = mesh.size
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % devices:
            raise ValueError(f"{key}={config[key]} does not split evenly over {devices} devices")
    per_device = config.batch_size // devices
    if group and config.batch_size > group and per_device % group:
        raise ValueError(
            f"model.bn_group_size={group} does not divide the {per_device} images that each of "
            f"{devices} devices holds at batch_size={config.batch_size}: a BN group never "
            f"spans devices. Use a batch_size that is a multiple of {group * devices}, or a "
            f"bn_group_size that divides {per_device}"
        )
    model = variants.build_model(config.model).clone(axis_name=DATA_AXIS)
    return Run(config, model, source, mesh)


def cross_entropy(logits, labels, num_classes, label_smoothing=0.0):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def loss_per_example(logits, targets, options: StepOptions):
    """The loss of each example against its (smoothed, possibly mixed) target distribution.

    "softmax": cross-entropy. "bce": binary cross-entropy of each class's sigmoid, averaged
    over the classes (timm's BinaryCrossEntropy); with `bce_target_threshold` > 0 a target
    above it counts as 1 and any other as 0 (timm's `target_threshold`).
    """
    if options.loss == "softmax":
        return optax.softmax_cross_entropy(logits, targets)
    if options.loss != "bce":
        raise ValueError(f"loss={options.loss!r}; choose one of {LOSSES}")
    if options.bce_target_threshold > 0:
        targets = (targets > options.bce_target_threshold).astype(targets.dtype)
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean(axis=-1)


def step_key(seed, step):
    """The random key of training step `step` (its mixing, its stochastic depth)."""
    return jax.random.fold_in(jax.random.key(seed), step)


def topk_correct(logits, labels, k):
    """Per example: is the label among the k highest logits? (All are, below k classes.)"""
    _, top = jax.lax.top_k(logits, min(k, logits.shape[-1]))
    return jnp.any(top == labels[:, None], axis=-1)


def train_step(state, batch, options=StepOptions(), axis_name=None):
    """One optimizer step; returns the new state and the batch's metrics.

    With `axis_name`, one device's part of a per-device step (`make_train_step`): `batch` is
    this device's rows, and the gradients and metrics are averaged over the devices, so that
    every device applies the same update, the one of the whole batch's mean loss. The batch is
    mixed first when `options` says so (resnext_jax/training/mixing.py); its top-1 and top-5
    errors are then those of the mixed images against their first labels.
    """
    over_devices = partial(parallel.pmean, axis_name=axis_name)
    key = step_key(options.seed, state.step)
    images = batch["image"]
    num_classes = state.params["head"]["bias"].shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes),
                                  options.label_smoothing)  # fmt: skip
    if options.mixes:
        images, targets = mixing.mix(
            images, targets, jax.random.fold_in(key, 0),
            mixup_alpha=options.mixup_alpha, cutmix_alpha=options.cutmix_alpha,
            prob=options.mix_prob, switch_prob=options.mix_switch_prob, axis_name=axis_name,
        )  # fmt: skip

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"drop_path": jax.random.fold_in(key, 1)},
        )
        loss = loss_per_example(logits, targets, options).mean()
        return loss, (logits, updates["batch_stats"])

    params = state.params
    # Per-device gradients, averaged below (not summed implicitly by shard_map).
    if parallel.spans_devices(axis_name):
        params = jax.tree.map(lambda p: jax.lax.pcast(p, axis_name, to="varying"), params)
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = over_devices(grads)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if state.ema is not None:
        state = state.replace(ema=update_ema(state.ema, state, options.ema_decay))
    metrics = over_devices({
        "loss": loss,
        "top1_error": 100 * (1 - topk_correct(logits, batch["label"], 1).mean()),
        "top5_error": 100 * (1 - topk_correct(logits, batch["label"], 5).mean()),
    })  # fmt: skip
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state, metrics


def update_ema(ema, state, decay):
    """The moving averages moved toward the state's new parameters and BN statistics."""
    new = {"params": state.params, "batch_stats": state.batch_stats}
    return jax.tree.map(lambda e, x: decay * e + (1 - decay) * x, ema, new)


def make_train_step(run: Run, donate=True):
    """The compiled training step over the run's mesh: (state, global batch) -> (state, metrics)."""
    step = partial(train_step, options=StepOptions.from_config(run.config), axis_name=DATA_AXIS)
    return parallel.per_device(
        step, run.mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()),
        donate_argnums=0 if donate else (),
    )  # fmt: skip


def eval_step(variables, batch, apply_fn, axis_name=None, flip=False):
    """Sums over the real (unmasked) examples of a padded batch (with `axis_name`: all rows).

    With `flip`, each NHWC image is also evaluated mirrored and the two softmax distributions
    are averaged: the loss and the ranks are those of the mean probabilities.
    """
    logits = apply_fn(variables, batch["image"], train=False)
    if flip:
        mirrored = apply_fn(variables, batch["image"][:, :, ::-1], train=False)
        # log of the mean probability, in log space (no underflow to log 0): log-probabilities,
        # whose cross_entropy is -log p(label)
        logits = jnp.logaddexp(
            jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1),
            jax.nn.log_softmax(mirrored.astype(jnp.float32), axis=-1),
        )
        logits = logits - jnp.log(2.0)
    mask = batch["mask"].astype(jnp.float32)
    loss = cross_entropy(logits, batch["label"], logits.shape[-1])
    sums = {
        "loss": jnp.sum(loss * mask),
        "top1_correct": jnp.sum(topk_correct(logits, batch["label"], 1) * mask),
        "top5_correct": jnp.sum(topk_correct(logits, batch["label"], 5) * mask),
        "examples": jnp.sum(mask),
    }
    return parallel.psum(sums, axis_name)


def make_eval_step(run: Run):
    """The compiled evaluation step over the run's mesh: (variables, global batch) -> sums."""
    step = partial(eval_step, apply_fn=run.model.apply, axis_name=DATA_AXIS,
                   flip=bool(run.config.get("eval_flip", False)))  # fmt: skip
    return parallel.per_device(step, run.mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P())


def make_predict_step(run: Run):
    """The compiled eval-mode forward over the run's mesh: (variables, global images) -> logits."""
    predict = partial(run.model.apply, train=False)
    return parallel.per_device(predict, run.mesh, in_specs=(P(), P(DATA_AXIS)),
                               out_specs=P(DATA_AXIS))  # fmt: skip


def evaluate(run: Run, variables, stop=None) -> dict | None:
    """Loss, top-1 and top-5 error (percent) over every eval example exactly once, and the
    number of bad examples the source left out; None if `stop()` turns true on the way."""
    step = make_eval_step(run)
    gate = runtime.StepGate()  # on CPU: one step's buffers at a time
    sums, skipped = None, 0
    for local in run.source.eval_batches(run.config.eval_batch_size):
        skipped += int(local.pop("skipped", 0))
        gate.wait(sums)
        out = step(variables, run.global_batch(local))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        if stop is not None and stop():
            return None
    sums = jax.tree.map(float, sums)
    n = sums["examples"]
    if n == 0:
        raise base.DataError(
            "no evaluation example could be read (all were left out as bad); check the eval "
            "split with scripts/check_dataset.py"
        )
    return {
        "loss": sums["loss"] / n,
        "top1_error": 100 * (1 - sums["top1_correct"] / n),
        "top5_error": 100 * (1 - sums["top5_correct"] / n),
        "examples": int(n),
        "skipped": parallel.process_sum(skipped),
    }


def create_train_state(run: Run, tx, rng) -> TrainState:
    """Initialize on the host's devices, replicated over the mesh."""
    shape = (1, *run.source.image_shape)

    def init():
        variables = run.model.init(rng, jnp.zeros(shape, jnp.float32))
        ema = None
        if run.config.get("ema_decay", 0.0) > 0:  # starts at the initial weights, as timm's
            ema = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        return TrainState.create(
            apply_fn=run.model.apply,
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            tx=tx,
            ema=ema,
        )

    return jax.jit(init, out_shardings=run.replicated)()


@jax.jit
def all_finite(tree):
    """Whether every leaf of `tree` is finite (one device-side reduction)."""
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
