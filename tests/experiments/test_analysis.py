"""resnext_jax.experiments.analysis (scripts/analyze.py): lesions, gradient norms, conv forms."""

import csv
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnext_jax.bench import conv as bench_conv
from resnext_jax.experiments import analysis
from resnext_jax.models import variants
from resnext_jax.models.resnet import block_specs
from resnext_jax.ops import conv
from resnext_jax.training import loop
from tests.conftest import init
from tests.training.test_loop import tiny_config


def basic_config(shortcut=True, **overrides):
    """A tiny basic-block net (an identity block, then a downsampling one), 2 steps."""
    model = variants.model_config("_tiny_basic", bn_group_size=8, shortcut=shortcut)
    return tiny_config(model=model, max_steps=2, **overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{shortcut: (workdir, results)} of the residual and the plain tiny net, 2 steps each."""
    runs = {}
    for shortcut in (True, False):
        workdir = tmp_path_factory.mktemp(f"shortcut_{shortcut}")
        runs[shortcut] = workdir, loop.train_and_evaluate(basic_config(shortcut), workdir)
    return runs


def test_config_from_json_restores_tuples():
    config = basic_config()
    again = analysis.config_from_json(json.loads(config.to_json()))
    assert again.to_dict() == config.to_dict()
    assert again.model.stage_sizes == (1, 1) and again.dataset.mean == ()


@pytest.mark.slow
def test_lesion_one_row_per_block_beside_the_run_error(trained, tmp_path):
    for shortcut, (workdir, results) in trained.items():
        result = analysis.lesion(workdir)
        assert result["unlesioned"]["top1_error"] == results["top1_error"]
        assert result["step"] == 2 and result["shortcut"] is shortcut
        rows = result["rows"]
        assert [(r["block"], r["downsamples"], r["projection"], r["removable"]) for r in rows] == [
            ("stage1_block0", False, False, True),
            ("stage2_block0", True, shortcut, shortcut),
        ]
        assert all(r["unlesioned_top1_error"] == results["top1_error"] for r in rows)
        for r in rows:
            if r["removable"]:
                assert 0 <= r["top1_error"] <= 100 and np.isfinite(r["loss"]) and not r["reason"]
            else:
                assert r["top1_error"] is None and "no identity" in r["reason"]
        paths = analysis.write_outputs(tmp_path, f"lesion_{shortcut}", result, rows,
                                       analysis.LESION_COLUMNS)  # fmt: skip
        with paths["csv"].open() as f:
            table = list(csv.DictReader(f))
        assert tuple(table[0]) == analysis.LESION_COLUMNS and len(table) == 2
        assert json.loads(paths["json"].read_text())["rows"] == rows
        assert analysis.plot_lesion(result, tmp_path / "lesion.png").stat().st_size > 0


def test_lesion_plot_marks_blocks_that_are_not_removable(tmp_path):
    rows = [
        {"block_index": 0, "block": "stage1_block0", "downsamples": False, "removable": True,
         "top1_error": 30.0},
        {"block_index": 1, "block": "stage2_block0", "downsamples": True, "removable": False,
         "top1_error": None},
    ]  # fmt: skip
    result = {"rows": rows, "unlesioned": {"top1_error": 20.0}, "model": "m", "shortcut": False,
              "step": 2}  # fmt: skip
    assert analysis.plot_lesion(result, tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"


def test_gradient_norms_match_an_explicit_gradient_at_a_block_input():
    """Finite positive norms; a block's parameter norm is that of the plain jax.grad; through a
    lesioned (identity) block the input gradient passes unchanged. (tests/models/test_resnet.py
    checks the block-input gradient against jax.grad through the block's input itself.)"""
    config = basic_config()
    model = variants.build_model(config.model)
    batch = analysis.first_batch(config, 16)
    variables = init(model, batch["image"])
    rows = analysis.gradient_norms(model, variables, batch)
    assert [r["block"] for r in rows] == [s.name for s in block_specs(model)]
    for r in rows:
        assert 0 < r["input_grad_norm"] < np.inf and 0 < r["param_grad_norm"] < np.inf

    def loss(params, image):
        logits, _ = model.apply({**variables, "params": params}, image, train=True,
                                mutable=["batch_stats"])  # fmt: skip
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    params_grad = jax.grad(loss)(variables["params"], batch["image"])
    expected = float(optax.tree.norm(params_grad["stage2_block0"]))
    assert rows[1]["param_grad_norm"] == pytest.approx(expected, rel=1e-5)
    # A lesioned (identity) first block: its input gradient is its output's, which is the
    # second block's input gradient.
    lesioned = analysis.gradient_norms(model.clone(lesioned=("stage1_block0",)), variables, batch)
    assert lesioned[0]["input_grad_norm"] == pytest.approx(lesioned[1]["input_grad_norm"], 1e-6)
    assert lesioned[0]["param_grad_norm"] == 0
    assert rows[0]["input_grad_norm"] != pytest.approx(rows[1]["input_grad_norm"], 1e-3)


@pytest.mark.slow
def test_gradients_at_init_and_every_checkpoint(trained, tmp_path):
    rows = []
    for shortcut, (workdir, _) in trained.items():
        config = basic_config(shortcut)
        rows += analysis.gradients(config, workdir, batch_size=16, label=f"net {shortcut}")
    steps = sorted({r["step"] for r in rows})
    assert steps == [0, 2]  # initialization and the one checkpoint (step 2)
    assert len(rows) == 2 * 2 * len(steps)  # nets x blocks x steps
    assert all(0 < r["input_grad_norm"] < np.inf and 0 < r["param_grad_norm"] for r in rows)
    init_rows = analysis.gradients(basic_config(), batch_size=16)
    assert [r["input_grad_norm"] for r in init_rows] == [
        r["input_grad_norm"] for r in rows if r["shortcut"] and r["step"] == 0
    ]
    paths = analysis.write_outputs(tmp_path, "gradients", {"rows": rows}, rows,
                                   analysis.GRADIENT_COLUMNS)  # fmt: skip
    with paths["csv"].open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert analysis.plot_gradients({"rows": rows}, tmp_path / "g.png").stat().st_size > 0


def test_conv_forms_count_the_worked_example(tmp_path):
    rows = analysis.conv_forms(height=28, width=28, channels=32, out_channels=32, kernel=3,
                               groups=8)  # fmt: skip
    counts = {r["form"]: (r["params"], r["multiply_adds"]) for r in rows}
    assert counts == {
        "dense": (9_216, 28 * 28 * 9_216),
        "grouped (g=8)": (1_152, 28 * 28 * 1_152),
        "depthwise": (288, 28 * 28 * 288),
        "depthwise-separable": (1_312, 28 * 28 * 1_312),
    }
    assert counts["dense"][1] == 7_225_344
    pointwise = conv.select_impl((1, 28, 28, 32), (1, 1, 32, 32), 1, 1)  # onednn where built
    assert rows[-1]["auto_impl"].endswith(f"+{pointwise}")
    dense = conv.select_impl((1, 28, 28, 32), (3, 3, 32, 32), 1, 1)
    table = analysis.markdown_table(rows, analysis.CONV_COLUMNS)
    assert f"| dense | auto | {dense} | 9,216 | 7,225,344 |  |  |" in table
    assert analysis.plot_convs({"rows": rows}, tmp_path / "c.png").stat().st_size > 0


@pytest.mark.slow
def test_conv_forms_time_every_implementation_auto_may_choose():
    rows = analysis.conv_forms(height=6, width=6, channels=8, out_channels=8, kernel=3,
                               groups=2, batch=2, timer=bench_conv.time_stacks, reps=1)  # fmt: skip
    candidates = [i for i in analysis.AUTO_CANDIDATES
                  if i != "onednn" or analysis.conv_ops.onednn_usable()]  # fmt: skip
    by_form = {}
    for r in rows:
        by_form.setdefault(r["form"], []).append(r["impl"])
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
    assert by_form == {"dense": ["auto"], "grouped (g=2)": candidates,
                       "depthwise": candidates, "depthwise-separable": candidates}  # fmt: skip


@pytest.mark.slow
def test_analyze_convs_command_writes_json_csv_and_png(tmp_path):
    out = subprocess.run(
        [sys.executable, "scripts/analyze.py", "convs", "--height=4", "--width=4",
         "--channels=4", "--out_channels=4", "--groups=2", "--batch=2", "--reps=1",
         f"--out={tmp_path}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "| form | impl |" in out
    assert {p.name for p in tmp_path.iterdir()} == {"convs.json", "convs.csv", "convs.png"}
    saved = json.loads((tmp_path / "convs.json").read_text())
    assert saved["groups"] == 2 and saved["rows"][0]["params"] == 3 * 3 * 4 * 4
    assert jnp.isfinite(saved["rows"][0]["fwd_ms"])
