"""resnext_jax.devices.runtime: when the entry points re-execute themselves under tcmalloc."""

import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from resnext_jax.devices import runtime


@pytest.fixture
def lib_dir(tmp_path):
    (tmp_path / runtime.LIBRARY).write_bytes(b"")
    return str(tmp_path)


def _exec_calls(monkeypatch, lib_dir, **env):
    for name in ("LD_PRELOAD", runtime.OFF_SWITCH):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    runtime.use_tcmalloc(search_path=("/nonexistent", lib_dir), execv=lambda *a: calls.append(a))
    return calls


def test_reexecutes_with_tcmalloc_preloaded(monkeypatch, lib_dir):
    calls = _exec_calls(monkeypatch, lib_dir, LD_PRELOAD="libother.so")
    assert calls == [(sys.executable, [sys.executable, *sys.orig_argv[1:]])]
    assert os.environ["LD_PRELOAD"] == f"{lib_dir}/{runtime.LIBRARY}:libother.so"
    assert runtime.allocator() == "tcmalloc"


@pytest.mark.parametrize(
    "env", [{"LD_PRELOAD": "/x/libtcmalloc.so"}, {runtime.OFF_SWITCH: "0"}]
)  # fmt: skip
def test_no_reexec_when_preloaded_or_turned_off(monkeypatch, lib_dir, env):
    assert _exec_calls(monkeypatch, lib_dir, **env) == []


def test_no_reexec_without_the_library(monkeypatch, tmp_path):
    assert _exec_calls(monkeypatch, str(tmp_path)) == []
    assert runtime.allocator() == "system malloc"


def test_a_script_runs_under_tcmalloc_where_installed(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "from resnext_jax.devices import runtime\n"
        "if __name__ == '__main__':\n"
        "    runtime.use_tcmalloc()\n"
        "    import os, sys\n"
        "    print(runtime.allocator(), sys.argv[1:])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", runtime.OFF_SWITCH)}
    out = subprocess.run([sys.executable, str(script), "--flag=1"], env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    expected = "tcmalloc" if runtime.tcmalloc_path() else "system malloc"
    assert out == f"{expected} ['--flag=1']\n"


def _compiled_text(fn, *args, options):
    import jax

    return jax.jit(fn, compiler_options=options).lower(*args).compile().as_text()


def test_compiler_options_turn_off_ynnpack_fusions_on_cpu():
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "cpu":
        pytest.skip("the option only changes XLA CPU")
    x = jnp.ones((512, 128))  # YNNPACK takes reductions above some size only

    def bn_sum(x):  # a batch norm gradient's sum(x * dy), which XLA CPU hands to YNNPACK
        return jnp.sum(x * (x + 1), axis=0)

    options = runtime.compiler_options()
    assert options == runtime.NO_YNN
    assert "__ynn_fusion" not in _compiled_text(bn_sum, x, options=options)
    # If XLA stops making YNNPACK fusions by default, this option (and its docs) are moot.
    assert "__ynn_fusion" in _compiled_text(bn_sum, x, options={})
    assert runtime.xla_cpu_fusions() == "XLA CPU without YNNPACK fusions"


def test_ynn_switch_keeps_xla_default(monkeypatch):
    monkeypatch.setenv(runtime.YNN_SWITCH, "1")
    runtime.compiler_options.cache_clear()
    try:
        assert runtime.compiler_options() == {}
        assert runtime.xla_cpu_fusions() == "XLA's default fusions"
    finally:
        runtime.compiler_options.cache_clear()


def test_steps_in_flight_is_one_on_cpu_only():
    assert runtime.steps_in_flight("cpu") == 1
    assert runtime.steps_in_flight("gpu") == runtime.steps_in_flight("tpu") == 2


def test_the_step_gate_waits_for_the_previous_steps_buffers():
    """Under tcmalloc the gate waits until the bytes handed out fall back after a step; here a
    fake allocator frees the previous step's 1 GB on the third poll."""
    gate = runtime.StepGate("cpu", threshold=100, patience=5.0)
    polls = iter([0, 10**9, 10**9, 10**9, 10, 10])
    gate.allocated = lambda: next(polls)
    gate.wait(None)  # before the first step: records 0
    assert gate.before == 0
    gate.wait(jnp.ones(2))  # the previous step's buffers still held: waits for the drop
    assert gate.before == 10
    idle = runtime.StepGate("gpu")
    assert not idle.one_at_a_time and idle.allocated is None
    idle.wait(jnp.ones(2))  # nothing to wait for on accelerators
