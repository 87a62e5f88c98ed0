"""scripts/model_stats.py prints computed figures beside the paper's."""

import json
import subprocess
import sys

import pytest


def _run(*args):
    done = subprocess.run([sys.executable, "scripts/model_stats.py", *args], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return done.stdout


@pytest.mark.slow
def test_json_rows():
    rows = json.loads(_run("resnext50_32x4d", "configs/fashion_mnist.py", "--format=json"))
    assert [r["name"] for r in rows] == ["resnext50_32x4d", "resnext11_4x16d"]
    first = rows[0]
    assert first["params"] == 25_028_904 and first["paper_params"] == 25_028_904
    assert abs(first["flops"] / 4.2e9 - 1) < 0.03 and first["conv2_group_width"] == 128
    assert first["paper_top1_error"] == 22.2
    assert rows[1]["image_size"] == 28


@pytest.mark.slow
def test_default_prints_table1_and_table3():
    out = _run()
    assert "### Table 1" in out and "### Table 3" in out
    lines = [line for line in out.splitlines() if line.startswith("| res")]
    assert len(lines) == 12  # 2 rows of Table 1, 10 settings of Table 3
    assert "| resnext101_8x14d | 45.104 | - | 8.08 | 7.8 | 112 | 112 | 21.3 |" in out
