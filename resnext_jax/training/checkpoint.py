"""Checkpoints: a run's train state, and variables checkpoints that carry their model config.

A run's checkpoints live in WORKDIR/checkpoints, one Orbax step folder per save holding the
train state and `meta` (step, wall time, best and latest eval); `checkpoint_manager`,
`restore_latest` and `save` are what the trainer and `scripts/eval.py` use.

A variables checkpoint is a folder holding `model.json` (the model config) and `variables/`
(an Orbax checkpoint of {"params", "batch_stats"}). `scripts/convert_torchvision.py` writes
one, `scripts/eval.py --checkpoint=DIR` evaluates one, and `--config.init_from=DIR` starts
training (fine-tuning) from one.
"""

import json
import pathlib

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from resnext_jax.models import variants

CHECKPOINT_DIR = "checkpoints"  # in a run's workdir
MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"


def save_variables(path, variables, model_config) -> pathlib.Path:
    """Write `variables` ({"params", "batch_stats"}) and their model config to folder `path`."""
    path = pathlib.Path(path).absolute()
    if (path / VARIABLES_DIR).exists():
        raise FileExistsError(f"{path} already holds a checkpoint; choose a new folder")
    path.mkdir(parents=True, exist_ok=True)
    variables = {k: variables[k] for k in ("params", "batch_stats")}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / VARIABLES_DIR, jax.tree.map(np.asarray, variables))
    (path / MODEL_FILE).write_text(json.dumps(model_config.to_dict(), indent=2) + "\n")
    return path


def load_variables(path):
    """(variables, model config) from a folder written by `save_variables`."""
    path = pathlib.Path(path).absolute()
    if not (path / MODEL_FILE).is_file() or not (path / VARIABLES_DIR).is_dir():
        raise FileNotFoundError(
            f"{path} is not a variables checkpoint (it needs {MODEL_FILE} and {VARIABLES_DIR}/); "
            "write one with scripts/convert_torchvision.py or checkpoint.save_variables"
        )
    config = variants.default_model_config()
    config.update(json.loads((path / MODEL_FILE).read_text()))
    variants.validate(config)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            variables = checkpointer.restore(path / VARIABLES_DIR)
    except Exception as e:  # Orbax raises many types for damaged files; name the folder.
        raise ValueError(f"could not read the checkpoint in {path / VARIABLES_DIR}: {e}") from e
    return variables, ml_collections.ConfigDict(config.to_dict())


def checkpoint_manager(workdir, config) -> ocp.CheckpointManager:
    """The Orbax manager of WORKDIR/checkpoints, keeping `config.keep_checkpoints` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
    return ocp.CheckpointManager(
        pathlib.Path(workdir).absolute() / CHECKPOINT_DIR,
        options=options,
        # Handlers named up front, so the metadata of a step can be read before restoring it.
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )


class ModelMismatchError(ValueError):
    """A checkpoint holds another model than the config builds (not damage)."""


def restore_latest(manager, state, step=None):
    """(state, meta) from the latest (or the given) checkpoint; a clear error if unreadable,
    ModelMismatchError if it holds arrays of other names or shapes than `state`."""
    step = manager.latest_step() if step is None else step
    mismatches = model_mismatches(manager, step, state)
    if mismatches:
        shown = "; ".join(mismatches[:4]) + (
            f"; and {len(mismatches) - 4} more" if len(mismatches) > 4 else ""
        )
        raise ModelMismatchError(
            f"the checkpoint of step {step} in {manager.directory} holds another model than "
            f"this config builds ({shown}). The checkpoint is intact: resume it with the model "
            "config it was trained under, or train this model in a new workdir."
        )
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


def model_mismatches(manager, step, state) -> list[str]:
    """Where checkpoint `step`'s params and batch_stats differ in names or shapes from `state`'s
    ([] also if the checkpoint's metadata cannot be read: restoring then reports the damage)."""
    try:
        saved = manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)
        saved = {k: saved[k] for k in ("params", "batch_stats")}
    except Exception:  # Orbax raises many types for damaged files
        return []
    ours = {"params": state.params, "batch_stats": state.batch_stats}
    a, b = _shapes(saved), _shapes(ours)
    out = [
        f"{k}: {a[k]} in the checkpoint, {b[k]} here" for k in a.keys() & b.keys() if a[k] != b[k]
    ]
    out += [f"{k} only in the checkpoint" for k in a.keys() - b.keys()]
    out += [f"{k} only in this model" for k in b.keys() - a.keys()]
    return sorted(out)


def _shapes(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in leaves}  # fmt: skip


def save(manager, step, state, meta) -> None:
    """Start saving `state` and `meta` as checkpoint `step` (asynchronously)."""
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )


# Model fields that may differ between a pretrained checkpoint and the model it initializes.
FINE_TUNE_FREE = ("num_classes", "dtype", "conv_impl", "bn_momentum", "bn_group_size", "form")


def restore_pretrained(state, config, path, say=print):
    """`state` with the weights of variables checkpoint `path` (fine-tuning from it).

    The checkpoint's model must be `config.model` up to FINE_TUNE_FREE; a different class
    count keeps `state`'s fresh head (and says so through `say`).
    """
    variables, pretrained = load_variables(path)
    ours = {k: v for k, v in config.model.to_dict().items() if k not in FINE_TUNE_FREE}
    theirs = {k: v for k, v in pretrained.to_dict().items() if k not in FINE_TUNE_FREE}
    diff = {
        k: (theirs.get(k), v) for k, v in ours.items() if _as_list(theirs.get(k)) != _as_list(v)
    }
    if diff:
        raise ValueError(f"init_from={path} holds a different model: (checkpoint, config) = {diff}")
    params = dict(variables["params"])
    if pretrained.num_classes != config.model.num_classes:
        params["head"] = state.params["head"]
        say(
            f"init_from: {pretrained.num_classes}-class head replaced by a new "
            f"{config.model.num_classes}-class one"
        )

    def put(tree, like):
        shardings = jax.tree.map(lambda a: a.sharding, like)
        return jax.device_put(jax.tree.map(jax.numpy.asarray, tree), shardings)

    return state.replace(
        params=put(params, state.params),
        batch_stats=put(variables["batch_stats"], state.batch_stats),
    )


def _as_list(value):
    """Tuples and lists compare equal (a config read back from JSON holds lists)."""
    return list(value) if isinstance(value, tuple | list) else value
