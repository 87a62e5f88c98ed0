"""Model checkpoints outside a training run: variables plus the model config that built them.

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

from resnext_jax import variants

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
            "write one with scripts/convert_torchvision.py or resnext_jax.checkpoint.save_variables"
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
