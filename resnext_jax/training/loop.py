"""The training loop: `train_and_evaluate(config, workdir)` is one whole run.

A run is resume, loop, finish. `_resume` restores the latest checkpoint of the workdir (or
pretrained weights, or nothing), `_loop` steps, logs, evaluates and saves until the last step
or a preemption, `_finish` evaluates the final state and writes results.json. The state that
passes between them (train state, checkpoint meta, clock) is passed explicitly. What a step
computes is resnext_jax/training/steps.py; the files a run writes, resnext_jax/training/logs.py.
"""

import dataclasses
import json
import pathlib
import time

import jax
import ml_collections
import numpy as np

from resnext_jax.data import base
from resnext_jax.devices import parallel, runtime
from resnext_jax.models import inspector, variants
from resnext_jax.training import checkpoint, logs, optim, recipe, steps
from resnext_jax.training.preemption import Preemption


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """The run's length and rhythm, fixed by the config and the dataset."""

    steps_per_epoch: int
    total_steps: int
    eval_every: int
    log_every: int
    save_every: int

    @classmethod
    def of(cls, config, num_train) -> "Plan":
        steps_per_epoch = num_train // config.batch_size
        if steps_per_epoch == 0:
            raise ValueError(
                f"batch_size={config.batch_size} exceeds the {num_train} training examples"
            )
        total = max(1, round(config.num_epochs * steps_per_epoch))
        if config.max_steps > 0:
            total = min(total, config.max_steps)
        eval_every = max(1, round(config.eval_every_epochs * steps_per_epoch))
        return cls(steps_per_epoch, total, eval_every, config.log_every_steps,
                   config.checkpoint_every_steps)  # fmt: skip


@dataclasses.dataclass
class Clock:
    """Wall time of the run: the seconds of the sessions it resumes plus this one's."""

    earlier_s: float = 0.0
    start: float = dataclasses.field(default_factory=time.time)

    def elapsed(self) -> float:
        return self.earlier_s + time.time() - self.start


def new_meta() -> dict:
    """What each checkpoint carries beside the train state (JSON). `eval` holds the step it
    evaluated; `skipped_examples` counts the bad training examples replaced so far."""
    return {"step": 0, "wall_time_s": 0.0, "best_top1_error": None, "eval": None,
            "skipped_examples": 0}  # fmt: skip


def train_and_evaluate(config, workdir, accept_config_change=False) -> dict:
    """Train `config` in `workdir` (resuming whatever is there) and evaluate; the results.

    Resuming under a config that changes the experiment raises recipe.ConfigMismatchError
    unless `accept_config_change` (resnext_jax/training/recipe.py).
    """
    if "://" in str(workdir):
        raise ValueError(
            f"workdir {workdir}: the trainer writes its logs with plain file I/O; give a folder "
            "on a file system every host shares (for a bucket, mount it with gcsfuse)"
        )
    recipe.validate(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    manager = checkpoint.checkpoint_manager(workdir, config)
    try:
        latest, changes = manager.latest_step(), ({}, {})
        if latest is not None:
            changes = recipe.check_resume(workdir, json.loads(config.to_json()), latest,
                                          accept=accept_config_change)  # fmt: skip
        run = steps.build_run(config)
        plan = Plan.of(config, run.source.num_train)
        if latest is not None and latest > plan.total_steps:
            raise recipe.ConfigMismatchError(
                f"{workdir} holds a checkpoint of step {latest}, past this config's last step "
                f"{plan.total_steps}: evaluating it would report later weights as step "
                f"{plan.total_steps}. Raise --config.num_epochs or --config.max_steps, or "
                "train the shorter run in a new workdir."
            )
        if jax.process_index() == 0 and (note := recipe.record(workdir, latest, *changes)):
            print(note, flush=True)
        tx = optim.create_optimizer(config, plan.steps_per_epoch)
        state = steps.create_train_state(run, tx, jax.random.key(config.seed))
        state, meta, report = _resume(config, workdir, run, manager, state, plan)
        clock = Clock(meta["wall_time_s"])
        state, meta, stopped = _loop(config, run, manager, report, state, meta, plan, clock)
        if stopped:
            report.print(f"preempted: saved step {stopped}; rerun the same command to resume")
            report.close()
            return {"status": "preempted", "step": stopped}
        return _finish(config, workdir, run, report, state, meta, plan, clock)
    except checkpoint.ModelMismatchError as e:
        raise recipe.ConfigMismatchError(str(e)) from None
    finally:
        manager.close()  # waits for saves in flight, so a finished checkpoint is never lost


def _eval_due(meta, step, plan) -> bool:
    """Whether checkpoint `step` is an evaluation step whose evaluation its meta lacks (the
    loop saves before it evaluates, so a preemption may come between the two)."""
    done = meta["eval"] is not None and meta["eval"].get("step", meta["step"]) == step
    return step > 0 and not done and (step % plan.eval_every == 0 or step == plan.total_steps)


def _resume(config, workdir, run, manager, state, plan):
    """(state, meta, reporter) to continue from: the workdir's latest checkpoint, else the
    pretrained weights of `config.init_from`, else `state` as initialized."""
    meta = new_meta()
    if manager.latest_step() is not None:
        state, saved = checkpoint.restore_latest(manager, state)
        meta.update(saved)
        how = f"resuming from the checkpoint of step {int(state.step)}"
    elif config.init_from:
        how = f"starting from the weights in {config.init_from}"
    else:
        how = "starting from scratch"
    primary = jax.process_index() == 0
    step = int(state.step)
    report = logs.Reporter(workdir, plan.total_steps, plan.steps_per_epoch, config.batch_size,
                           enabled=primary, resume_step=step,
                           redo_eval=_eval_due(meta, step, plan))  # fmt: skip
    if manager.latest_step() is None and config.init_from:
        state = checkpoint.restore_pretrained(state, config, config.init_from, report.print)
    if primary:
        logs.write_json(workdir / logs.CONFIG_FILE, json.loads(config.to_json()))
    report.print(
        f"{variants.variant_name(config.model)} on {config.dataset.name}: {plan.total_steps} "
        f"steps of {config.batch_size} images ({plan.steps_per_epoch} per epoch) on "
        f"{jax.device_count()} device(s), {how}; workdir {workdir}"
    )
    return state, meta, report


def _loop(config, run, manager, report, state, meta, plan, clock):
    """Train from `state` to the plan's last step; (state, meta, step saved at a preemption
    or None).

    At an evaluation step the state is saved first and evaluated while the save is written, so
    a preemption during a long evaluation loses nothing: the resumed run evaluates that step.
    """
    train_step = steps.make_train_step(run)
    schedule = optim.learning_rate_schedule(config, plan.steps_per_epoch)
    start_step = int(state.step)
    batches = base.prefetch(run.source.train_batches(config.batch_size, config.seed, start_step))
    window = Window()
    pending = None  # (step, metrics) of the step in flight, checked one step late
    gate = runtime.StepGate()  # on CPU: one step's buffers at a time
    skipped = 0  # bad examples replaced in this process's rows since meta last counted them
    with Preemption(run.mesh) as preemption:
        if start_step < plan.total_steps and _eval_due(meta, start_step, plan):
            meta = _evaluate(run, state, meta, start_step, report)
        for step in range(start_step + 1, plan.total_steps + 1):
            local = next(batches)
            skipped += int(local.pop("skipped", 0))
            gate.wait(state)
            state, metrics = train_step(state, run.global_batch(local))
            if pending:  # wait for the previous step only, so the device queue stays full
                window.add(*pending, manager)
            pending = (step, metrics)
            first = step == start_step + 1
            last = step == plan.total_steps
            at_log = step % plan.log_every == 0 or last
            at_eval = step % plan.eval_every == 0 or last
            at_save = step % plan.save_every == 0 or at_eval
            stop = preemption.poll() or manager.reached_preemption(step)
            if first or at_log or at_save or stop:
                window.add(*pending, manager)
                pending = None
            if first:  # the first step compiles: throughput counts from its end
                window.restart_clock()
            if at_log or at_save or stop:  # the same steps on every process
                total = meta["skipped_examples"] + parallel.process_sum(skipped)
                meta, skipped = {**meta, "skipped_examples": total}, 0
            if at_log and window.steps:
                means, ips = window.means(), window.images_per_sec(config.batch_size)
                lr = float(schedule(step - 1))
                report.write("train", step, lr=lr, images_per_sec=ips, **means,
                             skipped_examples=meta["skipped_examples"])  # fmt: skip
                report.progress(step, means["loss"], means["top1_error"], ips, lr)
                window.reset()
            paused = time.time()
            if at_save or stop:
                meta = _save(manager, state, meta, step, clock)
            if at_eval and not stop:
                evaluated = _evaluate(run, state, meta, step, report, stop=preemption.poll)
                stop = evaluated is None
                meta = evaluated or meta
            window.start += time.time() - paused  # evaluating and saving are not training
            if stop:
                manager.wait_until_finished()
                return state, meta, step
    manager.wait_until_finished()
    return state, meta, None


def _finish(config, workdir, run, report, state, meta, plan, clock) -> dict:
    """Evaluate the final state unless the loop just did; write results.json; the results."""
    total = plan.total_steps
    if _eval_due(meta, total, plan):  # resumed at the very end
        meta = _evaluate(run, state, meta, total, report)
    shape = (1, *run.source.image_shape)
    final = meta["eval"]
    results = {
        "status": "finished",
        "config": json.loads(config.to_json()),
        "model": variants.variant_name(config.model),
        "dataset": config.dataset.name,
        "params": inspector.param_count(run.model, shape),
        "flops": inspector.multiply_adds(run.model, shape),
        "seed": config.seed,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "batch_size": config.batch_size,
        "epochs": total / plan.steps_per_epoch,
        "steps": total,
        "top1_error": final["top1_error"],
        "top5_error": final["top5_error"],
        "eval_loss": final["loss"],
        "eval_examples": final["examples"],
        "skipped_eval_examples": final.get("skipped", 0),
        "skipped_train_examples": meta["skipped_examples"],
        "best_top1_error": meta["best_top1_error"],
        "wall_time_s": clock.elapsed(),
    }
    if "ema_top1_error" in final:  # the moving average's (config.ema_decay)
        results.update({k: final[k] for k in ("ema_top1_error", "ema_top5_error")},
                       ema_eval_loss=final["ema_loss"])  # fmt: skip
    if jax.process_index() == 0:
        logs.write_json(workdir / logs.RESULTS_FILE, results)
    report.print(
        f"done: top-1 error {results['top1_error']:.2f}%, top-5 error "
        f"{results['top5_error']:.2f}% after {total} steps in {results['wall_time_s']:.0f} s"
    )
    report.close()
    return results


def _evaluate(run, state, meta, step, report, stop=None) -> dict | None:
    """Evaluate `state`, log it; `meta` with this eval and the best top-1 so far (None if
    `stop()` said to stop before the evaluation ended)."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    result = steps.evaluate(run, variables, stop=stop)
    if result is not None and state.ema is not None:  # the moving average, beside the raw
        ema = steps.evaluate(run, state.ema, stop=stop)
        result = None if ema is None else {**result, **ema_fields(ema)}
    if result is None:
        report.print(f"eval at step {step} interrupted; the resumed run evaluates this step")
        return None
    result = {**result, "step": step}
    report.write("eval", step, **{k: v for k, v in result.items() if k != "step"})
    skipped = f", {result['skipped']} bad ones left out" if result.get("skipped") else ""
    ema = f"; EMA top-1 err {result['ema_top1_error']:.2f}%" if "ema_top1_error" in result else ""
    report.print(
        f"eval at step {step}: top-1 err {result['top1_error']:.2f}% "
        f"top-5 err {result['top5_error']:.2f}% loss {result['loss']:.4f} "
        f"({result['examples']} examples{skipped}){ema}"
    )
    best, top1 = meta["best_top1_error"], result["top1_error"]
    return {**meta, "eval": result, "best_top1_error": top1 if best is None else min(best, top1)}


EMA_FIELDS = ("top1_error", "top5_error", "loss")


def ema_fields(result: dict) -> dict:
    """An evaluation of the moving-average weights as `ema_`-prefixed fields."""
    return {f"ema_{k}": result[k] for k in EMA_FIELDS}


def _save(manager, state, meta, step, clock) -> dict:
    """Checkpoint `state` at `step` (never non-finite weights); the meta it was saved with."""
    if not bool(steps.all_finite(state.params)):
        check_finite({"params": float("nan")}, step, manager)
    meta = {**meta, "step": step, "wall_time_s": clock.elapsed()}
    checkpoint.save(manager, step, state, meta)
    return meta


def check_finite(metrics, step, manager):
    """Raise NonFiniteLossError naming the bad values and the checkpoint that is kept."""
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


class Window:
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
        check_finite({k: values[k] for k in ("loss", "grad_norm")}, step, manager)
        for k in self.KEYS:
            self.sums[k] += values[k]
        self.steps += 1

    def means(self):
        return {k: v / self.steps for k, v in self.sums.items()}

    def images_per_sec(self, batch_size):
        """Over the steps since the clock started; NaN if none (the compiling step)."""
        timed = self.steps - self.timed_from
        return timed * batch_size / (time.time() - self.start) if timed else float("nan")


def load_for_eval(config, workdir=None, checkpoint_dir=None, ema=False):
    """(run, variables) for `scripts/eval.py`: a workdir's latest state (with `ema`, its moving
    average) or a variables folder."""
    if ema and not workdir:
        raise ValueError("--ema evaluates a training workdir's moving average: give --workdir")
    if checkpoint_dir:
        variables, model_config = checkpoint.load_variables(checkpoint_dir)
        config = ml_collections.ConfigDict(config.to_dict())
        overrides = {k: config.model[k] for k in ("dtype", "conv_impl")}
        config.model = model_config
        config.model.update(overrides)
        run = steps.build_run(config)
        return run, jax.device_put(variables, run.replicated)
    run = steps.build_run(config)
    manager = checkpoint.checkpoint_manager(workdir, config)
    if manager.latest_step() is None:
        folder = pathlib.Path(workdir) / checkpoint.CHECKPOINT_DIR
        raise FileNotFoundError(f"no checkpoint in {folder}")
    tx = optim.create_optimizer(config, max(1, run.source.num_train // config.batch_size))
    state = steps.create_train_state(run, tx, jax.random.key(0))
    state, _ = checkpoint.restore_latest(manager, state)
    if ema:
        if state.ema is None:
            raise ValueError(f"{workdir} was trained without config.ema_decay: it has no EMA")
        return run, state.ema
    return run, {"params": state.params, "batch_stats": state.batch_stats}
