"""The layout docs/architecture.md describes: every import points down, scripts stay thin."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "resnext_jax"
# Bottom to top: a module may import from its own subpackage and the ones before it.
LAYERS = ("devices", "ops", "models", "data", "training", "experiments", "bench")
SCRIPT_LINES = 100


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """The project modules `path` imports, anywhere in it (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("resnext_jax")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("resnext_jax"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (ROOT / candidate.replace(".", "/")).with_suffix(".py").exists()
                found.add(candidate if is_module else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 else -1  # resnext_jax.<layer>.<module>


def test_every_module_lives_in_a_layer():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside the subpackages {LAYERS}: {loose}"
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert folders == set(LAYERS)


def test_imports_point_down():
    upward = [
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert not upward, upward


def test_no_import_cycle():
    graph = _graph()
    done, active = set(), []

    def visit(module):
        if module in active:
            cycle = active[active.index(module) :] + [module]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        if module in done:
            return
        active.append(module)
        for target in graph.get(module, ()):
            if target != module and not module.startswith(f"{target}."):  # a package's own init
                visit(target)
        active.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The two tests above can fail: the same reader on a deliberately broken import."""
    source = "from resnext_jax.training import steps\nfrom resnext_jax.ops import conv\n"
    path = tmp_path / "x.py"
    path.write_text(source)
    assert _imports(path) == {"resnext_jax.training.steps", "resnext_jax.ops.conv"}
    assert _layer("resnext_jax.training.steps") > _layer("resnext_jax.ops.conv")


def test_scripts_are_thin_command_lines():
    long = {
        p.name: n
        for p in (ROOT / "scripts").glob("*.py")
        if (n := len(p.read_text().splitlines())) > SCRIPT_LINES
    }
    assert not long, f"scripts over {SCRIPT_LINES} lines (move the logic into the package): {long}"


def test_tests_never_load_a_script_by_path():
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("*.py")
        if p.name != "test_architecture.py"
        and re.search(r"spec_from_file_location|load_module\([^)]*scripts/", p.read_text())
    ]
    assert not offenders, offenders
