"""Exact weight conversion between torchvision/timm ResNet state_dicts and our Flax variables.

torchvision's and timm's ResNet/ResNeXt share one state_dict layout (conv1, bn1,
layer{i}.{j}.conv{k}/bn{k}, downsample.0/1, fc) and our layer names map onto it one to one
(see resnext_jax.models.resnet). Conversion walks our model's variable tree, taken from
`jax.eval_shape` of its init, so a state_dict of any other model fails with a ValueError
naming the first key that differs. Conversion itself works on numpy arrays (torch tensors
are accepted); only the helpers that read or write .pth files or build torch models import
torch. `scripts/convert_torchvision.py` verifies a conversion (`verify_logits`) before it
writes anything, and never leaves a half-written output (`removed_on_failure`).
"""

import contextlib
import os
import pathlib
import pickle
import re
import secrets
import shutil
import zipfile
from collections.abc import Mapping
from functools import partial
from typing import NamedTuple

import jax
import numpy as np
from flax import traverse_util

from resnext_jax.models import inspector, variants
from resnext_jax.ops.conv import Conv

# The ResNet family of torchvision.models; timm's models of these names share the layout.
TORCHVISION_MODELS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
)  # fmt: skip

_MODULE_NAMES = {
    "stem_conv": "conv1",
    "stem_bn": "bn1",
    "proj_conv": "downsample.0",
    "proj_bn": "downsample.1",
    "head": "fc",
}
_TORCH_NAMES = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
_COLLECTIONS = ("params", "batch_stats")
VERIFY_TOLERANCE = 1e-4  # max |logit difference| that `verify_logits` accepts


class _Entry(NamedTuple):
    """One tensor: its state_dict key and shape, and where and how it sits in our variables."""

    key: str
    path: tuple[str, ...]  # (collection, module..., name)
    shape: tuple[int, ...]  # torch's
    flax_shape: tuple[int, ...]
    dtype: np.dtype
    layout: str  # "conv" (OIHW <-> HWIO), "dense" ((out, in) <-> (in, out)) or "same"


# Our layout from torch's, and torch's from ours.
_TO_FLAX = {"conv": (2, 3, 1, 0), "dense": (1, 0)}
_TO_TORCH = {"conv": (3, 2, 0, 1), "dense": (1, 0)}


def _as_config(config):
    return variants.model_config(config) if isinstance(config, str) else config


def _model_name(config) -> str:
    return f"{variants.variant_name(config)} with {config.num_classes} classes"


def _torch_module(path: tuple[str, ...]) -> str:
    parts = []
    for name in path:
        if m := re.fullmatch(r"stage(\d+)_block(\d+)", name):
            parts.append(f"layer{m[1]}.{m[2]}")
        elif name in _MODULE_NAMES:
            parts.append(_MODULE_NAMES[name])
        elif re.fullmatch(r"(conv|bn)\d+", name):
            parts.append(name)
        else:
            raise ValueError(
                f"layer {'/'.join(path)} has no torchvision equivalent; only form='grouped' "
                "models convert (map the result with resnext_jax.models.fig3.grouped_to_form)"
            )
    return ".".join(parts)


def _torchvision_order(calls):
    """Layers in call order, except that a block's projection shortcut comes after the block's
    last batch norm, where torchvision registers its `downsample` (ours runs first: that norm
    adds the shortcut)."""
    ordered, held = [], []
    for path, kind in calls:
        if path[-1] in ("proj_conv", "proj_bn"):
            held.append((path, kind))
            continue
        if held and path[:-1] != held[0][0][:-1]:
            ordered, held = ordered + held, []
        ordered.append((path, kind))
    return ordered + held


def _entries(config) -> list[_Entry]:
    """Every tensor of the model, in the order of torchvision's state_dict."""
    model = variants.build_model(config)
    calls, shapes = inspector.layers(model, (1, 32, 32, config.input_channels))
    order = _torchvision_order([(layer.path, type(layer.module)) for layer in calls])
    shapes = {c: traverse_util.flatten_dict(shapes.get(c, {})) for c in _COLLECTIONS}
    entries = []
    for path, kind in order:
        module = _torch_module(path)
        for collection, tree in shapes.items():
            for name in ("kernel", "scale", "bias", "mean", "var"):
                leaf = tree.pop((*path, name), None)
                if leaf is None:
                    continue
                layout = "same" if name != "kernel" else "conv" if kind is Conv else "dense"
                torch_shape = tuple(leaf.shape[i] for i in _TO_TORCH.get(layout, range(leaf.ndim)))
                entries.append(
                    _Entry(
                        f"{module}.{_TORCH_NAMES[name]}",
                        (collection, *path, name),
                        torch_shape,
                        tuple(leaf.shape),
                        leaf.dtype,
                        layout,
                    )
                )
    if left := [k for tree in shapes.values() for k in tree]:
        raise ValueError(f"variables {['/'.join(k) for k in left]} have no torchvision equivalent")
    return entries


def _check(have: Mapping, need: Mapping, what: str, hint: str = "") -> None:
    """Raise if `have` (name -> array) lacks, adds or reshapes any of `need` (name -> shape)."""
    missing = [k for k in need if k not in have]
    unexpected = [k for k in have if k not in need]
    mismatched = [k for k in need if k in have and tuple(np.shape(have[k])) != need[k]]
    problems = []
    if missing:
        k = missing[0]
        problems.append(f"{len(missing)} missing (first: {k!r}, shape {need[k]})")
    if unexpected:
        k = unexpected[0]
        problems.append(
            f"{len(unexpected)} unexpected (first: {k!r}, shape {tuple(np.shape(have[k]))})"
        )
    if mismatched:
        k = mismatched[0]
        problems.append(
            f"{len(mismatched)} of the wrong shape (first: {k!r} has shape "
            f"{tuple(np.shape(have[k]))}, the model needs {need[k]})"
        )
    if problems:
        raise ValueError(f"{what}: {'; '.join(problems)}{hint}")


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16, so widen that
        value = value.detach().cpu()
        return value.float().numpy() if str(value.dtype) == "torch.bfloat16" else value.numpy()
    return np.asarray(value)


def torchvision_shapes(config) -> dict[str, tuple[int, ...]]:
    """Key -> shape of model `config`'s torchvision state_dict, without num_batches_tracked."""
    config = _as_config(config)
    return {e.key: e.shape for e in _entries(config)}


def from_torchvision(state_dict: Mapping, config) -> dict:
    """Flax variables {"params", "batch_stats"} of model `config` from a torchvision state_dict.

    `state_dict` maps names to torch tensors or numpy arrays; `config` is a model config or a
    variant name. num_batches_tracked entries are ignored.
    """
    config = _as_config(config)
    entries = _entries(config)
    tensors = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
    hint = ""
    if tensors and all(k.startswith("module.") for k in tensors):
        hint = " (its keys start with 'module.', as DataParallel saves them; strip that prefix)"
    elif "fc.weight" in tensors and np.shape(tensors["fc.weight"])[0] != config.num_classes:
        hint = f" (its fc has {np.shape(tensors['fc.weight'])[0]} classes; set num_classes)"
    need = {e.key: e.shape for e in entries}
    _check(tensors, need, f"state_dict does not match {_model_name(config)}", hint)
    flat = {}
    for e in entries:
        value = _numpy(tensors[e.key])
        if e.layout in _TO_FLAX:
            value = value.transpose(_TO_FLAX[e.layout])
        flat[e.path] = np.ascontiguousarray(value, dtype=e.dtype)
    return traverse_util.unflatten_dict(flat)


def to_torchvision(variables: Mapping, config) -> dict:
    """A torchvision state_dict (name -> numpy array) of model `config`'s `variables`.

    It loads into torchvision's model with strict=True: every BN also gets a
    num_batches_tracked of 0 (eval mode does not read it).
    """
    config = _as_config(config)
    entries = _entries(config)
    flat = {
        "/".join((c, *k)): v
        for c in _COLLECTIONS
        for k, v in traverse_util.flatten_dict(variables.get(c, {})).items()
    }
    need = {"/".join(e.path): e.flax_shape for e in entries}
    _check(flat, need, f"variables do not match {_model_name(config)}")
    state_dict = {}
    for e in entries:
        value = np.asarray(flat["/".join(e.path)])
        if e.layout in _TO_TORCH:
            value = value.transpose(_TO_TORCH[e.layout])
        state_dict[e.key] = np.ascontiguousarray(value)
        if e.key.endswith(".running_var"):
            state_dict[e.key.replace("running_var", "num_batches_tracked")] = np.zeros((), np.int64)
    return state_dict


def load_state_dict(path) -> dict:
    """The state_dict (name -> torch tensor) saved in .pth file `path`, read with weights_only."""
    import torch

    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not objects it refused, but bytes it could not
            raise _damaged(path, e) from e
        refused = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
        raise ValueError(
            f"{path} is not a plain state_dict (torch.load with weights_only=True refused it, "
            "as it does a pickled model); save and pass model.state_dict() instead. "
            f"torch said: {refused[0]}"
        ) from e
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    # What torch raises for a truncated or garbled file depends on where the damage is: miniz
    # (RuntimeError), the unpickler (EOFError, KeyError, ...), the zip reader, or the OS.
    except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError,
            zipfile.BadZipFile) as e:  # fmt: skip
        raise _damaged(path, e) from e
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        keys = list(state_dict)[:5] if isinstance(state_dict, Mapping) else []
        raise ValueError(
            f"{path} holds a {type(state_dict).__name__} that is not a state_dict "
            f"(names -> tensors){f'; its keys begin {keys}' if keys else ''}. Pass the "
            "state_dict itself (for a training checkpoint, e.g. checkpoint['state_dict'])."
        )
    return dict(state_dict)


def _damaged(path, error: Exception) -> ValueError:
    size = os.path.getsize(path)
    said = (str(error).strip().splitlines() or [""])[0]
    return ValueError(
        f"{path} ({size} bytes) looks truncated or corrupt: torch.load could not read it "
        f"({type(error).__name__}{f': {said}' if said else ''}). Download it again (or save it "
        "again with torch.save(model.state_dict(), path))."
    )


def torch_tensors(state_dict: Mapping) -> dict:
    """`state_dict` with numpy arrays made torch tensors, e.g. for `load_state_dict`."""
    import torch

    # from_numpy shares memory: it needs a writable, C-ordered array (copied only if not).
    return {
        k: torch.from_numpy(np.require(_numpy(v), requirements="CW")) for k, v in state_dict.items()
    }


def save_state_dict(state_dict: Mapping, path) -> None:
    """Write `state_dict` (name -> numpy array or tensor) as a .pth file torch.load reads.

    The file appears whole or not at all: torch.save writes a temporary file beside it, which
    then replaces `path`, so a failed save leaves `path` as it was.
    """
    import torch

    path = pathlib.Path(path)
    # Not mkstemp: torch.save creates the file, so it gets the usual permissions, not 0600.
    partial_path = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        torch.save(torch_tensors(state_dict), partial_path)
        os.replace(partial_path, path)
    except BaseException:
        pathlib.Path(partial_path).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def removed_on_failure(path):
    """Run the body that writes file or folder `path`; if it raises, remove what it created.

    Nothing that existed before the body ran is removed: of a folder that existed, only the
    entries the body added; of folders it created above `path`, the topmost.
    """
    path = pathlib.Path(path).absolute()
    created = path
    while not created.parent.exists():
        created = created.parent
    existed = os.path.lexists(path)
    before = set(path.iterdir()) if path.is_dir() and not path.is_symlink() else None
    try:
        yield
    except BaseException:
        if not existed:
            _remove(created)
        elif before is not None:
            for entry in set(path.iterdir()) - before:
                _remove(entry)
        raise


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def torchvision_model(config):
    """torchvision's model with the layers of model `config`, in eval mode, random weights.

    A named torchvision variant comes from `torchvision.models.<name>`; other stage sizes,
    cardinalities and widths from torchvision's ResNet class, which builds those the same way.
    """
    import torchvision

    config = _as_config(config)
    required = dict(
        stem="imagenet",
        stem_width=64,
        planes=64,
        input_channels=3,
        shortcut=True,
        bn_epsilon=1e-5,
        form="grouped",
    )
    if wrong := {k: config[k] for k, v in required.items() if config[k] != v}:
        raise ValueError(f"torchvision's ResNet has {required}; this model has {wrong}")
    name = variants.variant_name(config)
    sizes = variants.stage_sizes(config)
    if name in TORCHVISION_MODELS and sizes == variants.IMAGENET_STAGES[config.depth]:
        model = getattr(torchvision.models, name)(weights=None, num_classes=config.num_classes)
    else:
        resnet = torchvision.models.resnet
        block = resnet.BasicBlock if variants.block_type(config) == "basic" else resnet.Bottleneck
        model = resnet.ResNet(
            block,
            list(sizes),
            num_classes=config.num_classes,
            groups=config.cardinality,
            width_per_group=config.base_width,
        )
    return model.eval()


def verify_logits(state_dict: Mapping, variables, config, image_size: int = 224):
    """Max |logit difference| of torchvision's model holding `state_dict` and ours, max |logit|.

    On 2 fixed random images; the two agree if the difference is at most VERIFY_TOLERANCE.
    """
    torch_model = torchvision_model(config)
    torch_model.load_state_dict(torch_tensors(state_dict))  # strict: every key used
    images = np.random.default_rng(0).standard_normal((2, 3, image_size, image_size), np.float32)
    return logit_difference(torch_model, variables, config, images)


def logit_difference(torch_model, variables, config, images: np.ndarray) -> tuple[float, float]:
    """Max |logit difference| of `torch_model` and ours (eval mode, NCHW `images`), max |logit|."""
    import torch

    with torch.no_grad():
        expected = torch_model.eval()(torch.from_numpy(images)).numpy()
    model = variants.build_model(_as_config(config))
    apply = jax.jit(partial(model.apply, train=False))
    logits = np.asarray(apply(variables, images.transpose(0, 2, 3, 1)))
    return float(np.max(np.abs(logits - expected))), float(np.max(np.abs(expected)))
