"""Loading config files and parsing family arguments (`configs/table3.py:depth=101,cw=8x14d`)."""

import importlib.util
import pathlib

import ml_collections


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
