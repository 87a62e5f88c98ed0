"""scripts/report.py on fabricated runs: exact tables and CSVs, unfinished runs listed, plots."""

import csv
import io
import json
import subprocess
import sys

import pytest

from resnext_jax.experiments import config_files, report


def table3_config(arg):
    return json.loads(config_files.load_config(f"configs/table3.py:{arg}").to_json())


def fmnist_config(depth, cardinality, base_width):
    """A Fashion-MNIST model of some depth and C x d, as a family of shallow ResNeXts would be."""
    config = json.loads(config_files.load_config("configs/fashion_mnist.py").to_json())
    config["model"].update(depth=depth, cardinality=cardinality, base_width=base_width)
    return config


def fake_run(workdir, config, seed, top1=None, params=1000, flops=2_000_000, epochs=2, ema=None):
    """A work directory as train.py leaves it: config.json, metrics.jsonl, and results.json
    if `top1` is given (finished). Train error is eval error + 1 at each epoch, which falls
    by 10 per epoch to `top1` (or to 30 for an unfinished run)."""
    workdir.mkdir(parents=True)
    config = dict(config, seed=seed)
    (workdir / "config.json").write_text(json.dumps(config))
    last = 30.0 if top1 is None else top1
    rows = []
    for epoch in range(1, epochs + 1):
        error = last + 10 * (epochs - epoch)
        rows.append({"split": "train", "step": 10 * epoch, "epoch": float(epoch), "loss": 1.0,
                     "lr": 0.1, "top1_error": error + 1, "top5_error": 1.0})  # fmt: skip
        rows.append({"split": "eval", "step": 10 * epoch, "epoch": float(epoch), "loss": 1.0,
                     "top1_error": error, "top5_error": 1.0, "examples": 100})  # fmt: skip
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if top1 is not None:
        results = {"config": config, "model": "x", "dataset": config["dataset"]["name"],
                   "params": params, "flops": flops, "seed": seed, "top1_error": top1,
                   "top5_error": top1 / 4, "best_top1_error": top1 - 1, "wall_time_s": 60.0,
                   "status": "finished"}  # fmt: skip
        if ema is not None:
            results["ema_top1_error"] = ema
        (workdir / "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    table3 = root / "table3"
    for seed, top1 in enumerate((24.0, 25.0, 26.0)):
        fake_run(table3 / f"depth-50_cw-1x64d/seed{seed}", table3_config("depth=50,cw=1x64d"),
                 seed, top1, params=25_557_032, flops=4_089_184_256)  # fmt: skip
    for seed, top1 in enumerate((22.0, 23.0)):
        fake_run(table3 / f"depth-50_cw-32x4d/seed{seed}", table3_config("depth=50,cw=32x4d"),
                 seed, top1, params=25_028_904 + seed, flops=4_230_000_000)  # fmt: skip
    fake_run(table3 / "depth-101_cw-8x14d/seed0", table3_config("depth=101,cw=8x14d"), 0, 21.5)
    fake_run(table3 / "depth-101_cw-32x4d/seed0", table3_config("depth=101,cw=32x4d"), 0)
    failed = table3 / "depth-101_cw-2x40d/seed0"
    failed.mkdir(parents=True)
    (failed / "train.log").write_text("$ python scripts/train.py ...\nerror: out of memory\n\n")
    manifest = {"config": "configs/table3.py", "seeds": 2, "overrides": [], "runs": [
        {"setting": "depth=101,cw=32x4d", "seed": s, "workdir": f"depth-101_cw-32x4d/seed{s}",
         "command": "..."} for s in (0, 1)]}  # fmt: skip
    (table3 / "sweep.json").write_text(json.dumps(manifest))
    fmnist = root / "fmnist"
    for depth, c, d, seed, top1 in ((11, 1, 64, 0, 9.0), (11, 1, 64, 1, 11.0), (11, 4, 16, 0, 8.0),
                                    (11, 32, 4, 0, 7.5), (20, 32, 4, 0, 6.0)):  # fmt: skip
        fake_run(fmnist / f"{depth}_{c}x{d}d/seed{seed}", fmnist_config(depth, c, d), seed, top1)
    out = root / "report"
    done = subprocess.run([sys.executable, "scripts/report.py", str(root), f"--out={out}"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return root, out, done.stdout


def read_csv(path):
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_markdown_table3_layout_with_paper_figures(runs_dir):
    _, out, stdout = runs_dir
    md = (out / "report.md").read_text()
    assert md in stdout
    assert "11 finished, 2 unfinished, 1 not started" in md
    assert (
        "| depth | 1x64d | paper | 8x14d | paper | 32x4d | paper |\n"
        "|---|---|---|---|---|---|---|\n"
        "| 50 | 25.00 ± 1.00 (n=3) | 23.9 |  |  | 22.50 ± 0.71 (n=2) | 22.2 |\n"
        "| 101 |  |  | 21.50 (n=1) | 21.3 | - (n=0, +1 unfinished) | 21.2 |\n"
    ) in md
    # Parameters vary between the two 32x4d runs (by one): mean ± std; the rest are alike.
    assert (
        "| depth | 1x64d | 8x14d | 32x4d |\n"
        "|---|---|---|---|\n"
        "| 50 | 25.56M / 4.09G |  | 25.03M ± 1 / 4.23G |\n"
        "| 101 |  | 1.00k / 2.00M |  |\n"
    ) in md


def test_markdown_other_dataset_shows_imagenet_resnext50_labelled(runs_dir):
    md = (runs_dir[1] / "report.md").read_text()
    assert (
        "| depth | 1x64d | paper (IN-50) | 4x16d | paper (IN-50) | 32x4d | paper (IN-50) |\n"
        "|---|---|---|---|---|---|---|\n"
        "| 11 | 10.00 ± 1.41 (n=2) | 23.9 | 8.00 (n=1) | - | 7.50 (n=1) | 22.2 |\n"
        "| 20 |  |  |  |  | 6.00 (n=1) | 22.2 |\n"
    ) in md
    assert (
        "paper (IN-50): the paper's ImageNet-1K top-1 error of ResNeXt-50 with the same C x d "
        "(Table 3), for the trend across settings: not a figure for fashion_mnist"
    ) in md


def test_unfinished_and_not_started_runs_are_listed(runs_dir):
    md = (runs_dir[1] / "report.md").read_text()
    unfinished = md.split("## Unfinished runs (not averaged)\n\n")[1].split("\n\n")[0]
    assert unfinished.splitlines() == [
        "- `table3/depth-101_cw-2x40d/seed0`: no config.json (it stopped before training); "
        "train.log: error: out of memory",
        "- `table3/depth-101_cw-32x4d/seed0`: resnext101_32x4d on imagenet2012, seed 0; "
        "step 20 (epoch 2); last eval top-1 error 30.00%",
    ]
    assert "## Not started (planned in sweep.json)\n\n- `table3/depth-101_cw-32x4d/seed1`: " \
           "depth=101,cw=32x4d seed 1\n" in md  # fmt: skip


def test_csv_files(runs_dir):
    out = runs_dir[1]
    table = {(r["dataset"], r["depth"]): r for r in read_csv(out / "table.csv")}
    assert set(table) == {("imagenet2012", "50"), ("imagenet2012", "101"),
                          ("fashion_mnist", "11"), ("fashion_mnist", "20")}  # fmt: skip
    row = table["imagenet2012", "50"]
    assert (row["1x64d top1 mean"], row["1x64d top1 std"], row["1x64d n"]) == ("25.0", "1.0", "3")
    assert (row["32x4d top1 mean"], row["32x4d top1 std"]) == ("22.5", "0.707107")
    assert (row["1x64d paper"], row["32x4d paper"], row["paper_reference"]) == (
        "23.9",
        "22.2",
        "paper",
    )
    row = table["imagenet2012", "101"]
    assert (row["8x14d top1 mean"], row["8x14d top1 std"], row["8x14d n"]) == ("21.5", "", "1")
    assert (row["32x4d top1 mean"], row["32x4d n"], row["32x4d paper"]) == ("", "0", "21.2")
    assert row["1x64d n"] == "" and row["4x16d n"] == ""  # no such setting at this depth
    row = table["fashion_mnist", "11"]
    assert (row["4x16d top1 mean"], row["4x16d paper"], row["paper_reference"]) == (
        "8.0",
        "",
        "paper (IN-50)",
    )

    settings = {(r["dataset"], r["depth"], r["setting"]): r for r in read_csv(out / "settings.csv")}
    assert len(settings) == 8
    s = settings["imagenet2012", "50", "32x4d"]
    assert (s["model"], s["n"], s["unfinished"]) == ("resnext50_32x4d", "2", "0")
    assert (s["params_mean"], s["params_std"]) == ("25028904.5", "0.707107")
    assert (s["top5_error_mean"], s["best_top1_error_mean"]) == ("5.625", "21.5")
    assert settings["imagenet2012", "101", "32x4d"]["unfinished"] == "1"

    runs = read_csv(out / "runs.csv")
    assert len(runs) == 14
    status = {r["path"]: r["status"] for r in runs}
    assert status["table3/depth-101_cw-32x4d/seed1"] == "not started"
    assert status["table3/depth-101_cw-32x4d/seed0"] == "unfinished"
    assert sum(s == "finished" for s in status.values()) == 11


def test_plots_are_written(runs_dir):
    out = runs_dir[1]
    for name in ("top1_vs_cardinality_imagenet2012.png", "curves_imagenet2012.png",
                 "top1_vs_cardinality_fashion_mnist.png", "curves_fashion_mnist.png"):  # fmt: skip
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, name
        assert f"]({name})" in (out / "report.md").read_text()


def test_curves_average_over_seeds(runs_dir):
    runs, _ = report.collect(runs_dir[0] / "fmnist")
    table = report.group(runs)["fashion_mnist"]
    setting = next(s for s in table if s.column == "1x64d")
    assert report.curves(setting, "eval") == ([1.0, 2.0], [20.0, 10.0])
    assert report.curves(setting, "train") == ([1.0, 2.0], [21.0, 11.0])


def test_settings_sharing_a_cell_get_their_own_rows(tmp_path):
    plain = table3_config("depth=50,cw=32x4d")
    plain["model"]["shortcut"] = False
    fake_run(tmp_path / "a", table3_config("depth=50,cw=32x4d"), 0, 22.0)
    fake_run(tmp_path / "b", plain, 0, 26.0)
    fake_run(tmp_path / "c", table3_config("depth=50,cw=1x64d"), 0, 24.0)
    md = (report.write_report(tmp_path, tmp_path / "out", plots=False)["report.md"]
          .read_text())  # fmt: skip
    # Two of the three settings have shortcuts: the label names the one that departs.
    assert (
        "| 50 | 24.00 (n=1) | 23.9 | 22.00 (n=1) | 22.2 |\n"
        "| 50 (model.shortcut=false) |  |  | 26.00 (n=1) | 26.1 |\n"
    ) in md


def test_paper_figures_print_as_the_paper_prints_them():
    cells = [report._paper_cell(v) for v in (23.0, 22.2, 3.65, 17.77, None)]
    assert cells == ["23.0", "22.2", "3.65", "17.77", "-"]


def degradation_config(depth, net):
    return json.loads(
        config_files.load_config(f"configs/degradation.py:depth={depth},net={net}").to_json()
    )


@pytest.fixture(scope="module")
def depth_study(tmp_path_factory):
    """A degradation sweep: plain and residual at depths 8 and 20, two seeds but one missing."""
    root = tmp_path_factory.mktemp("degradation")
    errors = {(8, "plain"): (10.0, 12.0), (20, "plain"): (14.0, 16.0),
              (8, "resnet"): (9.0, 11.0), (20, "resnet"): (7.0,)}  # fmt: skip
    for (depth, net), tops in errors.items():
        for seed, top1 in enumerate(tops):
            workdir = root / f"depth-{depth}_net-{net}/seed{seed}"
            fake_run(workdir, degradation_config(depth, net), seed, top1)
            # A second train row in the last epoch: the train error is the mean of 1.5 and
            # 2.0's rows, (top1 + 1 + top1 + 3) / 2 = top1 + 2.
            row = {"split": "train", "step": 15, "epoch": 1.5, "loss": 1.0, "lr": 0.1,
                   "top1_error": top1 + 3, "top5_error": 1.0}  # fmt: skip
            with (workdir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
    fake_run(root / "depth-20_net-resnet/seed1", degradation_config(20, "resnet"), 1)
    out = root / "report"
    written = report.write_report(root, out)
    return root, out, written


def test_depth_study_table_and_csv(depth_study):
    _, out, written = depth_study
    md = (out / "report.md").read_text()
    assert (
        "| depth | plain train | plain test | residual train | residual test |\n"
        "|---|---|---|---|---|\n"
        "| 8 | 13.00 ± 1.41 (n=2) | 11.00 ± 1.41 (n=2) | 12.00 ± 1.41 (n=2) "
        "| 10.00 ± 1.41 (n=2) |\n"
        "| 20 | 17.00 ± 1.41 (n=2) | 15.00 ± 1.41 (n=2) | 9.00 (n=1) "
        "| 7.00 (n=1, +1 unfinished) |\n"
    ) in md
    # One C x d setting: no trend across settings to set ResNeXt-50's figures beside.
    assert "| depth | 1x64d |\n" in md and "IN-50" not in md
    rows = read_csv(out / "depth_study.csv")
    assert [(r["depth"], r["net"], r["n"], r["unfinished"]) for r in rows] == [
        ("8", "plain", "2", "0"), ("8", "residual", "2", "0"),
        ("20", "plain", "2", "0"), ("20", "residual", "1", "1"),
    ]  # fmt: skip
    assert rows[2] == {"dataset": "fashion_mnist", "study": "", "depth": "20", "net": "plain",
                       "n": "2", "unfinished": "0", "train_top1_error_mean": "17.0",
                       "train_top1_error_std": "1.414214", "test_top1_error_mean": "15.0",
                       "test_top1_error_std": "1.414214"}  # fmt: skip
    assert written["depth_study.csv"] == out / "depth_study.csv"


def test_depth_study_plots_replace_the_table3_plots(depth_study):
    _, out, written = depth_study
    md = (out / "report.md").read_text()
    for name in ("error_vs_depth_fashion_mnist.png", "curves_by_depth_fashion_mnist.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, name
        assert f"]({name})" in md and name in written
    assert not list(out.glob("top1_vs_cardinality_*")) and not list(out.glob("curves_fash*"))


def test_a_study_needs_both_shortcuts_and_two_depths(runs_dir, tmp_path):
    runs, _ = report.collect(runs_dir[0])
    assert report.depth_studies(report.group(runs)) == []  # Table 3 sweeps: no study
    fake_run(tmp_path / "a", degradation_config(8, "plain"), 0, 10.0)
    fake_run(tmp_path / "b", degradation_config(20, "plain"), 0, 12.0)
    fake_run(tmp_path / "c", degradation_config(20, "resnet"), 0, 9.0)
    other = degradation_config(8, "resnet")
    other["weight_decay"] = 5e-4  # another recipe: not part of the study
    fake_run(tmp_path / "d", other, 0, 9.0)
    studies = report.depth_studies(report.group(report.collect(tmp_path)[0]))
    assert [(s.label, sorted(s.cells)) for s in studies] == [
        ("", [(8, False), (20, False), (20, True)])
    ]
    assert not (
        report.write_report(tmp_path, tmp_path / "out", plots=False).keys()
        - {"report.md", "table.csv", "settings.csv", "runs.csv", "depth_study.csv"}
    )


def test_moving_average_errors_stand_beside_the_raw_ones(tmp_path):
    config = fmnist_config(11, 4, 16)
    smoothed = fmnist_config(11, 4, 16)
    smoothed["label_smoothing"] = 0.1
    for seed, (top1, ema) in enumerate(((8.0, 7.0), (9.0, 8.0))):
        fake_run(tmp_path / f"a/seed{seed}", config, seed, top1, ema=ema)
    fake_run(tmp_path / "b/seed0", smoothed, 0, 6.0)  # trained without an EMA
    out = report.write_report(tmp_path, tmp_path / "out", plots=False)
    md = out["report.md"].read_text()
    assert "| depth | 4x16d | 4x16d EMA |\n" in md
    assert "| 11 (label_smoothing=0.0) | 8.50 ± 0.71 (n=2) | 7.50 ± 0.71 (n=2) |\n" in md
    assert "| 11 (label_smoothing=0.1) | 6.00 (n=1) | - (n=0) |\n" in md
    settings = {r["variant"]: r for r in read_csv(out["settings.csv"])}
    assert settings["label_smoothing=0.0"]["ema_top1_error_mean"] == "7.5"
    assert settings["label_smoothing=0.1"]["ema_top1_error_mean"] == ""
    runs = {r["path"]: r for r in read_csv(out["runs.csv"])}
    assert runs["a/seed1"]["ema_top1_error"] == "8.0"


def test_an_ablation_labels_each_row_with_its_change_alone(tmp_path):
    base = fmnist_config(11, 4, 16)
    smoothed = fmnist_config(11, 4, 16)
    smoothed["label_smoothing"] = 0.1
    wide = fmnist_config(11, 4, 16)
    wide["model"].update(planes=64, stem_width=64)
    for name, config, top1 in (("base", base, 7.0), ("ls", smoothed, 6.5), ("wide", wide, 6.0)):
        fake_run(tmp_path / name, config, 0, top1)
    md = (report.write_report(tmp_path, tmp_path / "out", plots=False)["report.md"]
          .read_text())  # fmt: skip
    assert (
        "| 11 | 7.00 (n=1) |\n"
        "| 11 (label_smoothing=0.1) | 6.50 (n=1) |\n"
        "| 11 (model.planes=64, model.stem_width=64) | 6.00 (n=1) |\n"
    ) in md


def test_curves_of_many_rows_form_a_grid(tmp_path):
    """Six rows of a table: two rows of panels (at most report.CURVE_COLUMNS wide), not six in
    one strip whose titles run into each other."""
    for depth in (11, 20, 29, 38, 47, 56):
        fake_run(tmp_path / "runs" / f"d{depth}/seed0", fmnist_config(depth, 4, 16), 0, 7.0)
    out = tmp_path / "report"
    command = [sys.executable, "scripts/report.py", str(tmp_path / "runs"), f"--out={out}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    png = (out / "curves_fashion_mnist.png").read_bytes()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert 2.0 < width / height < 3.0, (width, height)  # 4 x 2 panels; one strip would be 7.4


def test_runs_from_before_a_field_was_added_join_their_setting(tmp_path):
    """A run whose config.json predates a field (recipe.ADDED) ran at the value that keeps the
    old behaviour: it is a seed of the same setting, not a setting of its own."""
    new = fmnist_config(11, 4, 16)
    old = json.loads(json.dumps(new))
    del old["eval_flip"], old["dataset"]["random_erasing"]
    fake_run(tmp_path / "old/seed0", old, 0, 7.0)
    fake_run(tmp_path / "new/seed1", new, 1, 8.0)
    table = report.group(report.collect(tmp_path)[0])["fashion_mnist"]
    assert len(table) == 1 and len(table[0].runs) == 2
    assert table[0].variant == ""
