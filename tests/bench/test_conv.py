"""resnext_jax.bench.conv (scripts/bench_grouped_conv.py): shape specs and the rows it times."""

import jax.numpy as jnp
import pytest

from resnext_jax.bench import conv as bench
from resnext_jax.ops import onednn
from resnext_jax.ops.conv import select_impl


def test_parse_shape_defaults_and_options():
    assert bench.parse_shape("16x56x56x128:g32") == ((16, 56, 56, 128), 3, 1, 32, 128)
    assert bench.parse_shape("16x56x56x256:k1:s2:o512") == ((16, 56, 56, 256), 1, 2, 1, 512)
    with pytest.raises(ValueError, match="use gN, kN, sN or oN"):
        bench.parse_shape("16x56x56x256:x3")


@pytest.mark.slow
def test_pointwise_rows_only_on_dense_1x1_shapes():
    _, rows = bench.bench_shape("2x5x5x8:k1:s2:o12", ["pointwise", "shift"], False, 1, jnp.float32)
    mark = "auto" if select_impl((2, 5, 5, 8), (1, 1, 8, 12), 2, 1) == "pointwise" else "xla_auto"
    assert [r.split(" | ")[1] for r in rows] == ["dense C=1", f"pointwise ({mark})", "shift"]
    _, rows = bench.bench_shape("2x5x5x8:g2", ["pointwise", "shift"], False, 1, jnp.float32)
    mark = "auto" if select_impl((2, 5, 5, 8), (3, 3, 4, 8), 1, 2) == "shift" else "xla_auto"
    assert [r.split(" | ")[1] for r in rows] == ["dense C=1", f"shift ({mark})"]


def test_an_unknown_impl_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--impls=shift,nope"])
    assert exit_info.value.code == 2
    assert "unknown impls ['nope']" in capsys.readouterr().err


@pytest.mark.skipif(not onednn.available(), reason="oneDNN path not built here")
def test_the_unfolded_row_runs_the_kernel_gradient_at_the_groups_own_width():
    """Where `onednn` folds (4 channels a group: 16 groups as 4), a row beside it does not."""
    args = ("onednn", (2, 5, 5, 64), 3, 3, 16, 64, jnp.float32)  # stride 3: oneDNN's kernels
    fns, _ = bench.timed_functions(*args)
    unfolded, _ = bench.timed_functions(*args, fold=False)

    def kernel_grads(compiled):  # the kernel-gradient calls' result shapes
        lines = compiled.as_text().splitlines()
        return [line.split(" = ")[1].split("{")[0] for line in lines if "conv_kernel_grad" in line]

    assert kernel_grads(fns["dw"]) == ["f32[3,3,16,64]"]  # 4 groups of 16 inputs
    assert kernel_grads(unfolded["dw"]) == ["f32[3,3,4,64]"]
    _, rows = bench.bench_shape("2x5x5x64:g16:s3", ["onednn"], True, 1, jnp.float32)
    assert [r.split(" | ")[1] for r in rows] == ["dense C=1", "onednn (auto)", bench.UNFOLDED]
    _, rows = bench.bench_shape("2x5x5x64:g8", ["onednn"], True, 1, jnp.float32)  # 8 a group
    assert bench.UNFOLDED not in " ".join(rows)


@pytest.mark.skipif(not onednn.available(), reason="oneDNN path not built here")
def test_where_the_narrow_kernel_runs_a_row_times_onednns():
    if not onednn.narrow_conv_applies((3, 3, 4, 64), 1, 1, 16, jnp.float32):
        pytest.skip("this CPU has no AVX-512")
    args = ("onednn", (2, 5, 5, 64), 3, 1, 16, 64, jnp.float32)
    calls = lambda c: [n for n in ("narrow_conv", "conv_forward") if n in c.as_text()]  # noqa: E731
    assert calls(bench.timed_functions(*args)[0]["fwd"]) == ["narrow_conv"]
    assert calls(bench.timed_functions(*args, own_kernels=False)[0]["fwd"]) == ["conv_forward"]
    _, rows = bench.bench_shape("2x5x5x64:g16", ["onednn"], True, 1, jnp.float32)
    assert [r.split(" | ")[1] for r in rows] == [
        "dense C=1", "onednn (auto)", bench.ONEDNN_KERNELS, bench.UNFOLDED]  # fmt: skip


@pytest.mark.skipif(not onednn.available(), reason="oneDNN path not built here")
def test_where_the_pointwise_matmul_runs_a_row_times_onednns_conv():
    args = ("onednn", (2, 7, 7, 64), 1, 1, 1, 128, jnp.float32)  # 98 positions, 128 outputs
    calls = lambda c: [n for n in ("pointwise_kernel_grad", "conv_kernel_grad") if n in c.as_text()]  # noqa: E731, E501
    assert calls(bench.timed_functions(*args)[0]["dw"]) == ["pointwise_kernel_grad"]
    assert calls(bench.timed_functions(*args, own_kernels=False)[0]["dw"]) == ["conv_kernel_grad"]
    _, rows = bench.bench_shape("2x7x7x64:k1:o128", ["onednn"], True, 1, jnp.float32)
    assert [r.split(" | ")[1] for r in rows] == ["dense C=1", "onednn (auto)", bench.ONEDNN_KERNELS]
