import jax.numpy as jnp
import pytest

from resnext_jax.bench import norm
from resnext_jax.ops import onednn


def test_shapes_parse_with_the_default_group():
    assert norm.parse_shape("16x56x56x256") == ((16, 56, 56, 256), 32)
    assert norm.parse_shape("128x7x7x64:g128") == ((128, 7, 7, 64), 128)
    with pytest.raises(ValueError, match="NxHxWxC"):
        norm.parse_shape("16x56x256")


@pytest.mark.skipif(not onednn.available(), reason="oneDNN path not built here")
def test_a_row_marks_autos_pick():
    one_group = norm.bench_shape("4x5x5x8", reps=1)  # 4 images, groups of 32: one group
    assert one_group.startswith("| 4x5x5x8 | 1 |") and "(auto)" in one_group.split("|")[4]
    # and oneDNN's primitives, the ReLU's gradient in XLA, and three ratios
    assert len(one_group.split("|")) == 11
    two_groups = norm.bench_shape("4x5x5x8:g2", reps=1)
    assert "(auto)" in two_groups.split("|")[3]


@pytest.mark.skipif(not onednn.available(), reason="oneDNN path not built here")
def test_bfloat16_rows_pick_onednn_at_any_number_of_groups():
    two_groups = norm.bench_shape("4x5x5x8:g2", reps=1, dtype=jnp.bfloat16)
    assert two_groups.startswith("| 4x5x5x8:g2 | 2 |") and "(auto)" in two_groups.split("|")[4]
