"""The recipe of a run: a training config checked when it loads, and against its workdir's.

`validate` rejects a config whose intervals, sizes or choices cannot train, listing every bad
field at once. `compare` splits the differences between the config a workdir was trained under
(its config.json) and a new one into those that change the experiment, which a resumed run
refuses, and those that only change how the run is watched or how long it lasts (FREE), which
go through and are recorded in the workdir's history.jsonl (README "Failure and recovery").
"""

import json
import pathlib
import time

from resnext_jax.data import base
from resnext_jax.models import variants
from resnext_jax.training import logs, optim, steps

HISTORY_FILE = "history.jsonl"  # in a run's workdir: one row per launch that changed the config

# Fields a resumed run may change: when it logs, evaluates and saves, how it reads its data,
# how its convs compute (the same arithmetic), how long it lasts, what it does with a bad file.
FREE = (
    "log_every_steps", "eval_every_epochs", "checkpoint_every_steps", "keep_checkpoints",
    "max_steps", "eval_batch_size", "init_from", "model.conv_impl", "dataset.workers",
    "dataset.data_dir", "dataset.bad_examples", "eval_flip",
)  # fmt: skip
# Fields the config gained after runs were trained without them, each with the value that
# keeps the earlier behaviour (configs/default.py's): absent in a workdir's config and at this
# value in the new one, they leave its experiment unchanged.
ADDED = {
    "adam_betas": [0.9, 0.999], "adam_eps": 1e-8, "lr_min": 0.0,
    "loss": "softmax", "bce_target_threshold": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0,
    "mix_prob": 1.0, "mix_switch_prob": 0.5, "ema_decay": 0.0, "model.drop_path_rate": 0.0,
    "dataset.randaugment_n": 0, "dataset.randaugment_m": 9.0, "dataset.randaugment_mstd": 0.0,
    "dataset.random_erasing": 0.0, "dataset.repeated_augmentation": 1, "eval_flip": False,
}  # fmt: skip
# The length of a run is free where the schedule does not depend on it (step decay); a cosine
# schedule is stretched by it, so there num_epochs changes every step's learning rate.
LENGTH = ("num_epochs",)


class ConfigMismatchError(ValueError):
    """A resumed run's config differs from the one its workdir was trained under."""


def validate(config) -> None:
    """Raise ValueError naming every field of `config` that cannot train, and what it takes."""
    c, ds = config, config.dataset
    rules = [
        ("batch_size", c.batch_size >= 1, "an integer >= 1"),
        ("eval_batch_size", c.eval_batch_size >= 1, "an integer >= 1"),
        ("num_epochs", c.num_epochs > 0, "> 0"),
        ("max_steps", c.max_steps >= 0, ">= 0 (0: no limit)"),
        ("log_every_steps", c.log_every_steps >= 1, "an integer >= 1"),
        ("checkpoint_every_steps", c.checkpoint_every_steps >= 1, "an integer >= 1"),
        ("eval_every_epochs", c.eval_every_epochs > 0, "> 0"),
        ("keep_checkpoints", c.keep_checkpoints >= 1, "an integer >= 1"),
        ("learning_rate", c.learning_rate >= 0, ">= 0"),
        ("lr_batch_size", c.lr_batch_size >= 1, "an integer >= 1"),
        ("momentum", 0 <= c.momentum < 1, "in [0, 1)"),
        ("weight_decay", c.weight_decay >= 0, ">= 0"),
        ("warmup_epochs", c.warmup_epochs >= 0, ">= 0"),
        ("lr_drop_factor", c.lr_drop_factor > 0, "> 0"),
        ("label_smoothing", 0 <= c.label_smoothing < 1, "in [0, 1)"),
        ("grad_clip_norm", c.grad_clip_norm >= 0, ">= 0 (0: no clipping)"),
        ("optimizer", c.optimizer in optim.OPTIMIZERS, f"one of {optim.OPTIMIZERS}"),
        ("adam_betas", len(c.adam_betas) == 2 and all(0 <= b < 1 for b in c.adam_betas),
         "two numbers in [0, 1)"),
        ("adam_eps", c.adam_eps > 0, "> 0"),
        ("lr_min", c.lr_min >= 0, ">= 0"),
        ("loss", c.loss in steps.LOSSES, f"one of {steps.LOSSES}"),
        ("bce_target_threshold", 0 <= c.bce_target_threshold < 1, "in [0, 1) (0: off)"),
        ("mixup_alpha", c.mixup_alpha >= 0, ">= 0 (0: off)"),
        ("cutmix_alpha", c.cutmix_alpha >= 0, ">= 0 (0: off)"),
        ("mix_prob", 0 <= c.mix_prob <= 1, "in [0, 1]"),
        ("mix_switch_prob", 0 <= c.mix_switch_prob <= 1, "in [0, 1]"),
        ("ema_decay", 0 <= c.ema_decay < 1, "in [0, 1) (0: off)"),
        ("lr_schedule", c.lr_schedule in optim.SCHEDULES, f"one of {optim.SCHEDULES}"),
        ("weight_decay_on", c.weight_decay_on in optim.WEIGHT_DECAY_ON,
         f"one of {optim.WEIGHT_DECAY_ON}"),
        ("dataset.image_size", ds.image_size >= 1, "an integer >= 1"),
        ("dataset.num_train_examples", ds.num_train_examples >= 0, ">= 0 (0: all)"),
        ("dataset.num_eval_examples", ds.num_eval_examples >= 0, ">= 0 (0: all)"),
        ("dataset.workers", ds.get("workers", 0) >= 0, ">= 0 (0: one per CPU core)"),
        ("dataset.bad_examples", ds.get("bad_examples", "error") in base.BAD_EXAMPLE_POLICIES,
         f"one of {base.BAD_EXAMPLE_POLICIES}"),
    ]  # fmt: skip
    bad = [f"{name}={_value(c, name)!r} (must be {rule})" for name, ok, rule in rules if not ok]
    if bad:
        raise ValueError(f"config: {'; '.join(bad)}. Fix these fields (--config.FIELD=VALUE).")
    variants.validate(c.model)


def _value(config, dotted):
    for key in dotted.split("."):
        config = config.get(key)
    return config


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"model": {"depth": 50}} -> {"model.depth": 50}; tuples as lists (as JSON reads them)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


ABSENT = "<absent>"


def differences(old: dict, new: dict) -> dict:
    """{dotted field: (old value, new value)} where the config dicts `old` and `new` differ."""
    a, b = flatten(old), flatten(new)
    keys = sorted(a.keys() | b.keys())
    return {
        k: (a.get(k, ABSENT), b.get(k, ABSENT))
        for k in keys
        if a.get(k, ABSENT) != b.get(k, ABSENT)
    }


def compare(old: dict, new: dict, finished=False) -> tuple[dict, dict]:
    """(differences that change the experiment, differences that do not) from config `old`
    (a workdir's) to `new`. A `finished` run's length is part of its experiment. A field that
    `old` lacks (the config gained it after that run began, `ADDED`) and `new` sets to the
    value that keeps the earlier behaviour does not change the experiment."""
    free = set(FREE)
    if not finished and flatten(old).get("lr_schedule") == "step" == flatten(new).get(
        "lr_schedule"
    ):
        free.update(LENGTH)
    diff = differences(old, new)
    free.update(k for k, (a, b) in diff.items()
                if a == ABSENT and k in ADDED and b == ADDED[k])  # fmt: skip
    changed = {k: v for k, v in diff.items() if k not in free}
    return changed, {k: v for k, v in diff.items() if k in free}


def with_added(config: dict) -> dict:
    """A copy of a saved config dict with every `ADDED` field it lacks at the value that keeps
    its run's behaviour, so runs from before and after a field was added compare alike."""
    out = json.loads(json.dumps(config))
    for dotted, value in ADDED.items():
        *parents, name = dotted.split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node.setdefault(name, value)
    return out


def describe(diff: dict) -> str:
    """One line per field: `  model.cardinality: 32 in the workdir, 8 now`."""
    return "\n".join(f"  {k}: {_show(old)} in the workdir, {_show(new)} now"
                     for k, (old, new) in diff.items())  # fmt: skip


def _show(value):
    return value if value == ABSENT else json.dumps(value)


def saved_config(workdir) -> dict | None:
    """The config a workdir was trained under (its config.json), or None if it has none."""
    path = pathlib.Path(workdir) / logs.CONFIG_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigMismatchError(
            f"{path} is unreadable ({e}); it records the recipe this workdir was trained under. "
            "Restore it, or delete it to resume under the config given now."
        ) from e


def check_resume(workdir, config: dict, step: int, accept=False) -> tuple[dict, dict]:
    """(changes to the experiment, other changes) from `workdir`'s config to `config`, each
    {field: (old, new)}, for resuming its checkpoint `step`; ConfigMismatchError if the first
    is not empty, unless `accept`."""
    old = saved_config(workdir)
    if old is None:
        return {}, {}
    changed, free = compare(old, config)
    if changed and not accept:
        raise ConfigMismatchError(
            f"{workdir} holds a run at step {step} trained under another recipe:\n"
            f"{describe(changed)}\n"
            "Train the new recipe in a new workdir (--workdir=...), or rerun with "
            "--accept_config_change to continue this run under it (recorded in "
            f"{pathlib.Path(workdir) / HISTORY_FILE})."
        )
    return changed, free


def record(workdir, step: int, changed: dict, free: dict) -> str:
    """Append to history.jsonl the config changes (accepted ones, others) a resume at `step`
    goes on under; a note for the user ("" if nothing changed)."""
    changes = {**changed, **free}
    if not changes:
        return ""
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step,
           "accepted": sorted(changed), "changes": changes}  # fmt: skip
    with (pathlib.Path(workdir) / HISTORY_FILE).open("a") as f:
        f.write(json.dumps(row) + "\n")
    return f"resuming under a changed config (recorded in {HISTORY_FILE}):\n{describe(changes)}"


def read_history(workdir) -> list[dict]:
    """The rows of a workdir's history.jsonl (damaged lines left out)."""
    return logs.read_jsonl(pathlib.Path(workdir) / HISTORY_FILE)
