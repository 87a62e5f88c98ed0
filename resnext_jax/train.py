"""Training and evaluation. `train_and_evaluate(config, workdir)` is one whole run.

Data parallel over every device of every process: one mesh axis "data", the global batch
split along it, the train state replicated, and each step one program per device with its
reductions written out (resnext_jax/parallel.py). The same code runs on one CPU and on a pod.
"""

import dataclasses
import json
import pathlib
import signal
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from resnext_jax import checkpoint, input_pipeline, optim, parallel, reporting, stats, variants
from resnext_jax.parallel import DATA_AXIS

CHECKPOINT_DIR = "checkpoints"


class TrainState(train_state.TrainState):
    batch_stats: Any


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN or infinite."""


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
        """Assemble each process's numpy rows into one array sharded over the mesh."""
        return {
            k: jax.make_array_from_process_local_data(self.data_sharding, v)
            for k, v in local.items()
        }


def build_run(config, devices=None) -> Run:
    """Check the config against the data and the devices; clear errors before any compute.

    `devices` (default: every device of every process) are the mesh the run's steps use.
    """
    variants.validate(config.model)
    source = input_pipeline.get_source(config)
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


def topk_correct(logits, labels, k):
    """Per example: is the label among the k highest logits? (All are, below k classes.)"""
    _, top = jax.lax.top_k(logits, min(k, logits.shape[-1]))
    return jnp.any(top == labels[:, None], axis=-1)


def train_step(state, batch, label_smoothing=0.0, axis_name=None):
    """One SGD step; returns the new state and the batch's metrics.

    With `axis_name`, one device's part of a per-device step (`make_train_step`): `batch` is
    this device's rows, and the gradients and metrics are averaged over the devices, so that
    every device applies the same update, the one of the whole batch's mean loss.
    """
    over_devices = partial(jax.lax.pmean, axis_name=axis_name) if axis_name else lambda t: t

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        loss = cross_entropy(logits, batch["label"], logits.shape[-1], label_smoothing).mean()
        return loss, (logits, updates["batch_stats"])

    params = state.params
    if axis_name:  # per-device gradients, averaged below (not summed implicitly by shard_map)
        params = jax.tree.map(lambda p: jax.lax.pcast(p, axis_name, to="varying"), params)
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = over_devices(grads)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = over_devices({
        "loss": loss,
        "top1_error": 100 * (1 - topk_correct(logits, batch["label"], 1).mean()),
        "top5_error": 100 * (1 - topk_correct(logits, batch["label"], 5).mean()),
    })  # fmt: skip
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state, metrics


def make_train_step(run: Run, donate=True):
    """The compiled training step over the run's mesh: (state, global batch) -> (state, metrics)."""
    step = partial(train_step, label_smoothing=run.config.label_smoothing, axis_name=DATA_AXIS)
    return parallel.per_device(
        step, run.mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()),
        donate_argnums=0 if donate else (),
    )  # fmt: skip


def eval_step(variables, batch, apply_fn, axis_name=None):
    """Sums over the real (unmasked) examples of a padded batch (with `axis_name`: all rows)."""
    logits = apply_fn(variables, batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    loss = cross_entropy(logits, batch["label"], logits.shape[-1])
    sums = {
        "loss": jnp.sum(loss * mask),
        "top1_correct": jnp.sum(topk_correct(logits, batch["label"], 1) * mask),
        "top5_correct": jnp.sum(topk_correct(logits, batch["label"], 5) * mask),
        "examples": jnp.sum(mask),
    }
    return jax.lax.psum(sums, axis_name) if axis_name else sums


def make_eval_step(run: Run):
    """The compiled evaluation step over the run's mesh: (variables, global batch) -> sums."""
    step = partial(eval_step, apply_fn=run.model.apply, axis_name=DATA_AXIS)
    return parallel.per_device(step, run.mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P())


def make_predict_step(run: Run):
    """The compiled eval-mode forward over the run's mesh: (variables, global images) -> logits."""
    predict = partial(run.model.apply, train=False)
    return parallel.per_device(predict, run.mesh, in_specs=(P(), P(DATA_AXIS)),
                               out_specs=P(DATA_AXIS))  # fmt: skip


def evaluate(run: Run, variables) -> dict:
    """Loss, top-1 and top-5 error (percent) over every eval example exactly once."""
    step = make_eval_step(run)
    sums = None
    for local in run.source.eval_batches(run.config.eval_batch_size):
        out = step(variables, run.global_batch(local))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.tree.map(float, sums)
    n = sums["examples"]
    return {
        "loss": sums["loss"] / n,
        "top1_error": 100 * (1 - sums["top1_correct"] / n),
        "top5_error": 100 * (1 - sums["top5_correct"] / n),
        "examples": int(n),
    }


def create_train_state(run: Run, tx, rng) -> TrainState:
    """Initialize on the host's devices, replicated over the mesh."""
    shape = (1, *run.source.image_shape)

    def init():
        variables = run.model.init(rng, jnp.zeros(shape, jnp.float32))
        return TrainState.create(
            apply_fn=run.model.apply,
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            tx=tx,
        )

    return jax.jit(init, out_shardings=run.replicated)()


def _restore_pretrained(state, config, path, report) -> TrainState:
    """Start from a variables checkpoint (fine-tuning); a new head if the class count differs."""
    variables, pretrained = checkpoint.load_variables(path)
    ignore = ("num_classes", "dtype", "conv_impl", "bn_momentum", "bn_group_size", "form")
    ours = {k: v for k, v in config.model.to_dict().items() if k not in ignore}
    theirs = {k: v for k, v in pretrained.to_dict().items() if k not in ignore}
    diff = {k: (theirs.get(k), v) for k, v in ours.items() if _plain(theirs.get(k)) != _plain(v)}
    if diff:
        raise ValueError(f"init_from={path} holds a different model: (checkpoint, config) = {diff}")
    params = dict(variables["params"])
    if pretrained.num_classes != config.model.num_classes:
        params["head"] = state.params["head"]
        report.print(
            f"init_from: {pretrained.num_classes}-class head replaced by a new "
            f"{config.model.num_classes}-class one"
        )
    put = lambda tree, like: jax.device_put(  # noqa: E731
        jax.tree.map(jnp.asarray, tree), jax.tree.map(lambda a: a.sharding, like)
    )
    return state.replace(
        params=put(params, state.params),
        batch_stats=put(variables["batch_stats"], state.batch_stats),
    )


def _plain(value):
    return list(value) if isinstance(value, tuple | list) else value


class _Preemption:
    """Turns SIGTERM into a request to save and stop, at the same step in every process.

    With one process the run stops after the step during which the signal came. With several,
    a process that stopped alone would leave the others waiting in the next collective, and a
    signal often reaches only one of them. So every step each process casts its request into a
    vote, a max over the mesh dispatched behind the step like its metrics and read one step
    later; every process reads the same outcome after the same step and stops there.
    """

    def __init__(self, mesh):
        self.requested = False
        self._previous = None
        self._ballot = None  # the vote in flight
        self._vote = None
        if jax.process_count() > 1:
            self._mesh = mesh
            self._vote = jax.jit(jnp.max, out_shardings=parallel.replicated(mesh))

    def poll(self) -> bool:
        """Once per step, after dispatching it: whether to save and stop after this step."""
        if self._vote is None:
            return self.requested
        ballot, flags = self._ballot, np.full(len(self._mesh.local_devices), self.requested)
        self._ballot = self._vote(
            jax.make_array_from_process_local_data(parallel.data_sharded(self._mesh), flags)
        )
        return ballot is not None and bool(ballot)

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, as for any library code
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _checkpoint_manager(workdir, config):
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
    return ocp.CheckpointManager(
        pathlib.Path(workdir).absolute() / CHECKPOINT_DIR,
        options=options,
        item_names=("state", "meta"),
    )


def restore_latest(manager, state, step=None):
    """(state, meta) from the latest (or the given) checkpoint; a clear error if unreadable."""
    step = manager.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
    except Exception as e:  # Orbax raises many types for damaged or foreign files.
        raise RuntimeError(
            f"the checkpoint of step {step} in {manager.directory} could not be read ({e}). "
            f"Move that step's folder aside to resume from an earlier checkpoint; nothing "
            f"has been deleted."
        ) from e
    return restored.state, restored.meta


def _save(manager, step, state, meta):
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )


@jax.jit
def all_finite(tree):
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _check_finite(metrics, step, manager):
    bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
    if bad:
        manager.wait_until_finished()
        last = manager.latest_step()
        kept = (f"the last good checkpoint (step {last}) is kept in {manager.directory}"
                if last is not None else "no checkpoint had been saved yet")  # fmt: skip
        raise NonFiniteLossError(
            f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}; {kept}. "
            "Lower --config.learning_rate, set --config.grad_clip_norm, or check the input data; "
            "restarting resumes from that checkpoint."
        )


def train_and_evaluate(config, workdir) -> dict:
    """Train `config` in `workdir` (resuming whatever is there) and evaluate; the results."""
    if "://" in str(workdir):
        raise ValueError(
            f"workdir {workdir}: the trainer writes its logs with plain file I/O; give a folder "
            "on a file system every host shares (for a bucket, mount it with gcsfuse)"
        )
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run = build_run(config)
    source = run.source
    steps_per_epoch = source.num_train // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={config.batch_size} exceeds the {source.num_train} training examples"
        )
    total_steps = max(1, round(config.num_epochs * steps_per_epoch))
    if config.max_steps > 0:
        total_steps = min(total_steps, config.max_steps)
    tx = optim.create_optimizer(config, steps_per_epoch)
    state = create_train_state(run, tx, jax.random.key(config.seed))
    manager = _checkpoint_manager(workdir, config)
    try:
        return _train(config, workdir, run, manager, state, steps_per_epoch, total_steps)
    finally:
        manager.close()  # waits for saves in flight, so a finished checkpoint is never lost


def _train(config, workdir, run, manager, state, steps_per_epoch, total_steps) -> dict:
    source = run.source
    eval_every = max(1, round(config.eval_every_epochs * steps_per_epoch))
    schedule = optim.learning_rate_schedule(config, steps_per_epoch)
    meta = {"step": 0, "wall_time_s": 0.0, "best_top1_error": None, "eval": None}
    primary = jax.process_index() == 0
    fine_tune = manager.latest_step() is None and bool(config.init_from)
    if manager.latest_step() is not None:
        state, meta = restore_latest(manager, state)
        resumed = f"resuming from the checkpoint of step {int(state.step)}"
    elif fine_tune:
        resumed = f"starting from the weights in {config.init_from}"
    else:
        resumed = "starting from scratch"
    start_step = int(state.step)
    report = reporting.Reporter(workdir, total_steps, steps_per_epoch, config.batch_size,
                                enabled=primary, resume_step=start_step)  # fmt: skip
    if fine_tune:
        state = _restore_pretrained(state, config, config.init_from, report)
    if primary:
        reporting.write_json(workdir / reporting.CONFIG_FILE, json.loads(config.to_json()))
    name = variants.variant_name(config.model)
    report.print(
        f"{name} on {config.dataset.name}: {total_steps} steps of {config.batch_size} images "
        f"({steps_per_epoch} per epoch) on {jax.device_count()} device(s), {resumed}; "
        f"workdir {workdir}"
    )

    p_train_step = make_train_step(run)
    session_start = time.time()

    earlier_sessions = meta["wall_time_s"]  # wall time of the runs this one resumes

    def elapsed():
        return earlier_sessions + time.time() - session_start

    def run_eval(step):
        result = evaluate(run, {"params": state.params, "batch_stats": state.batch_stats})
        best = meta["best_top1_error"]
        meta["best_top1_error"] = min(best, result["top1_error"]) if best else result["top1_error"]
        meta["eval"] = result
        report.write("eval", step, **result)
        report.print(
            f"eval at step {step}: top-1 err {result['top1_error']:.2f}% "
            f"top-5 err {result['top5_error']:.2f}% loss {result['loss']:.4f} "
            f"({result['examples']} examples)"
        )

    def save(step):
        if not bool(all_finite(state.params)):
            _check_finite({"params": float("nan")}, step, manager)
        meta.update(step=step, wall_time_s=elapsed())
        _save(manager, step, state, meta)

    batches = input_pipeline.prefetch(source.train_batches(config.batch_size, config.seed,
                                                           start_step))  # fmt: skip
    window = _Window()
    pending = None  # (step, metrics) of the step in flight, checked one step late
    with _Preemption(run.mesh) as preemption:
        for step in range(start_step + 1, total_steps + 1):
            state, metrics = p_train_step(state, run.global_batch(next(batches)))
            if pending:  # wait for the previous step only, so the device queue stays full
                window.add(*pending, manager)
            pending = (step, metrics)
            first = step == start_step + 1
            at_log = step % config.log_every_steps == 0 or step == total_steps
            at_eval = step % eval_every == 0 or step == total_steps
            at_save = step % config.checkpoint_every_steps == 0 or at_eval
            stop = preemption.poll() or manager.reached_preemption(step)
            if first or at_log or at_save or stop:
                window.add(*pending, manager)
                pending = None
            if first:  # the first step compiles: throughput counts from its end
                window.restart_clock()
            if at_log and window.steps:
                means, ips = window.means(), window.images_per_sec(config.batch_size)
                lr = float(schedule(step - 1))
                report.write("train", step, lr=lr, images_per_sec=ips, **means)
                report.progress(step, means["loss"], means["top1_error"], ips, lr)
                window.reset()
            paused = time.time()
            if at_eval:
                run_eval(step)
            if at_save or stop:
                save(step)
            window.start += time.time() - paused  # evaluating and saving are not training
            if stop:
                manager.wait_until_finished()
                report.print(f"preempted: saved step {step}; rerun the same command to resume")
                report.close()
                return {"status": "preempted", "step": step}
    manager.wait_until_finished()
    if meta["eval"] is None or meta["step"] != total_steps:  # resumed at the very end
        run_eval(total_steps)
    results = {
        "status": "finished",
        "config": json.loads(config.to_json()),
        "model": name,
        "dataset": config.dataset.name,
        "params": stats.param_count(run.model, (1, *source.image_shape)),
        "flops": stats.multiply_adds(run.model, (1, *source.image_shape)),
        "seed": config.seed,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "batch_size": config.batch_size,
        "epochs": total_steps / steps_per_epoch,
        "steps": total_steps,
        "top1_error": meta["eval"]["top1_error"],
        "top5_error": meta["eval"]["top5_error"],
        "eval_loss": meta["eval"]["loss"],
        "eval_examples": meta["eval"]["examples"],
        "best_top1_error": meta["best_top1_error"],
        "wall_time_s": elapsed(),
    }
    if primary:
        reporting.write_json(workdir / reporting.RESULTS_FILE, results)
    report.print(
        f"done: top-1 error {results['top1_error']:.2f}%, top-5 error "
        f"{results['top5_error']:.2f}% after {total_steps} steps in {results['wall_time_s']:.0f} s"
    )
    report.close()
    return results


class _Window:
    """Train metrics summed since the last log row, and when that window started."""

    KEYS = ("loss", "top1_error", "top5_error", "grad_norm")

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums, self.steps = dict.fromkeys(self.KEYS, 0.0), 0
        self.restart_clock()

    def restart_clock(self):
        self.start, self.timed_from = time.time(), self.steps

    def add(self, step, metrics, manager):
        """Fetch a finished step's metrics; stop on a non-finite loss or gradient."""
        values = {k: float(v) for k, v in metrics.items()}
        _check_finite({k: values[k] for k in ("loss", "grad_norm")}, step, manager)
        for k in self.KEYS:
            self.sums[k] += values[k]
        self.steps += 1

    def means(self):
        return {k: v / self.steps for k, v in self.sums.items()}

    def images_per_sec(self, batch_size):
        """Over the steps since the clock started; NaN if none (the compiling step)."""
        timed = self.steps - self.timed_from
        return timed * batch_size / (time.time() - self.start) if timed else float("nan")


def load_for_eval(config, workdir=None, checkpoint_dir=None):
    """(run, variables) for `scripts/eval.py`: a workdir's latest state or a variables folder."""
    if checkpoint_dir:
        variables, model_config = checkpoint.load_variables(checkpoint_dir)
        config = ml_collections.ConfigDict(config.to_dict())
        overrides = {k: config.model[k] for k in ("dtype", "conv_impl")}
        config.model = model_config
        config.model.update(overrides)
        run = build_run(config)
        return run, jax.device_put(variables, run.replicated)
    run = build_run(config)
    manager = _checkpoint_manager(workdir, config)
    if manager.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {pathlib.Path(workdir) / CHECKPOINT_DIR}")
    tx = optim.create_optimizer(config, max(1, run.source.num_train // config.batch_size))
    state, _ = restore_latest(manager, create_train_state(run, tx, jax.random.key(0)))
    return run, {"params": state.params, "batch_stats": state.batch_stats}
