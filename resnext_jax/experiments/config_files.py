"""Config files: loading them, family arguments, and the folder name of a config.

The config files live in the checkout's `configs/` folder (CONFIG_DIR), which is a folder of
files, not a Python package: a file builds on another with `sibling(__file__, "default")`.
A family takes arguments after a colon (`configs/table3.py:depth=101,cw=8x14d`), parsed
strictly by `parse_family_args`; `slug` turns them into one folder name for workdirs, sweeps
and report files alike.
"""

import importlib.util
import pathlib
import re

import ml_collections

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"


def parse_family_args(arg: str | None, allowed: dict[str, tuple], defaults: dict) -> dict:
    """`key=value,key=value` -> dict, strictly: unknown keys and values name what is allowed."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in allowed:
            raise ValueError(
                f"bad config argument {item!r}; expected key=value with keys {list(allowed)}"
            )
        choices = allowed[key]
        try:
            typed = type(choices[0])(value)
        except ValueError:
            typed = None
        if typed not in choices:
            raise ValueError(f"{key}={value!r} is not allowed; choose one of {list(choices)}")
        values[key] = typed
    return values


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load `path/to/config.py[:args]` the way ml_collections' `config_flags` does."""
    path, _, arg = spec.partition(":")
    module = load_module(path)
    config = module.get_config(arg) if arg else module.get_config()
    config.lock()
    return config


def load_module(path):
    """Import the config file at `path` as a module."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no config file {str(path)!r}")
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_module(name):
    """The checkout's config file configs/`name`.py, as a module."""
    return load_module(CONFIG_DIR / f"{name}.py")


def sibling(file, name):
    """The config file `name`.py beside `file` (a config file's `__file__`), as a module."""
    return load_module(pathlib.Path(file).with_name(f"{name}.py"))


def slug(text: str) -> str:
    """A folder-name form of `text`: depth=50,cw=32x4d -> depth-50_cw-32x4d ("" -> "default")."""
    flat = re.sub(r"[^A-Za-z0-9._-]+", "-", text.replace(",", "_").replace("=", "-"))
    return flat or "default"


def default_workdir(config_spec: str) -> str:
    """workdirs/table3_depth-101_cw-8x14d for configs/table3.py:depth=101,cw=8x14d."""
    path, _, args = config_spec.partition(":")
    stem = pathlib.PurePath(path).stem
    return f"workdirs/{stem}_{slug(args)}" if args else f"workdirs/{stem}"
