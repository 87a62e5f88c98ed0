"""Tables and plots of a directory of runs, in the layout of the paper's Table 3.

Every run directory (results.json, config.json, metrics.jsonl or a sweep's train.log) under a
root is read. Finished runs (results.json) of the same config but for the seed are one setting;
a setting's cell is at row `model.depth`, column `CxDd` (cardinality x base width), one table
per dataset. `scripts/report.py` is the command line.

A depth study (He et al. 2016, Fig. 1 and 6: the degradation problem) is detected by what its
settings vary, not by the family's name: settings of one dataset that are alike but for
`model.depth` (with `model.stage_sizes`) and `model.shortcut`, holding both shortcut values and
more than one depth, as configs/degradation.py's sweep does. Such a study gets a table of train
and test error by depth, plain against residual (depth_study.csv), a plot of both against
depth, and Fig. 6's training curves; the Table 3 plots, meaningless for it, are left out.
"""

import collections
import csv
import dataclasses
import io
import json
import math
import os
import pathlib
import statistics
import textwrap

import ml_collections

from resnext_jax.experiments import config_files, paper, sweeps
from resnext_jax.models import variants
from resnext_jax.training import logs, recipe

RUN_FILES = {logs.RESULTS_FILE, logs.CONFIG_FILE, logs.METRICS_FILE,
             sweeps.LOG_FILE}  # fmt: skip

# What the "paper" column holds, by the kind of dataset: (column header, footnote).
PAPER_COLUMNS = {
    "imagenet": ("paper", "the paper's ImageNet-1K top-1 error of the same network (Table 3; "
                 "Table 4 or, without shortcuts, Section 5.1 for those only they have)"),
    "cifar": ("paper (T7)", "the paper's test error of the same network on the same dataset "
              "(Table 7, mean of 10 runs)"),
    "other": ("paper (IN-50)", "the paper's ImageNet-1K top-1 error of ResNeXt-50 with the "
              "same C x d (Table 3), for the trend across settings: not a figure for {dataset}"),
}  # fmt: skip


@dataclasses.dataclass
class RunFiles:
    """What one workdir under the report's root holds."""

    path: str  # relative to the report's root
    config: dict | None
    results: dict | None  # None: unfinished
    metrics: list
    note: str = ""

    @property
    def seed(self):
        return self.config.get("seed") if self.config else None


@dataclasses.dataclass
class Setting:
    """The runs of one config, all but the seed alike."""

    config: dict
    runs: list = dataclasses.field(default_factory=list)  # finished
    unfinished: list = dataclasses.field(default_factory=list)
    variant: str = ""  # the fields that tell apart settings sharing a table cell

    @property
    def dataset(self):
        return self.config["dataset"]["name"]

    @property
    def depth(self):
        return self.config["model"]["depth"]

    @property
    def column(self):
        m = self.config["model"]
        return f"{m['cardinality']}x{m['base_width']}d"

    @property
    def sort_key(self):
        m = self.config["model"]
        return m["cardinality"], m["base_width"]

    @property
    def row(self):
        return self.depth, self.variant

    @property
    def model(self):
        return variants.variant_name(ml_collections.ConfigDict(self.config["model"]))

    def values(self, key):
        return [r.results[key] for r in self.runs if r.results.get(key) is not None]

    def paper_top1(self):
        return paper_figure(self.dataset, self.model, self.column)


def paper_kind(dataset: str) -> str:
    if dataset.startswith("imagenet"):
        return "imagenet"
    return "cifar" if dataset in ("cifar10", "cifar100") else "other"


def paper_figure(dataset: str, model: str, column: str):
    """The paper's top-1 error to show beside a cell (see PAPER_COLUMNS), or None."""
    kind = paper_kind(dataset)
    if kind == "imagenet":
        if model.endswith("_plain"):  # Section 5.1: the network without shortcuts
            ablation = paper.tables()["residual_ablation_top1_error"]
            return ablation.get(model.removesuffix("_plain"), {}).get("without_shortcut")
        return paper.figures(model).get("top1_error")
    if kind == "cifar":
        return paper.tables()["table7_cifar_test_error"].get(model, {}).get(dataset)
    return paper.tables()["table3_top1_error"]["50"].get(column)


def collect(root) -> tuple[list[RunFiles], list[str]]:
    """(every run directory under `root`, the runs that sweep manifests plan but none started)."""
    root = pathlib.Path(root)
    runs, manifests = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if sweeps.MANIFEST_FILE in filenames:
            manifests.append(pathlib.Path(dirpath))
        if RUN_FILES.isdisjoint(filenames):
            continue
        dirnames.clear()  # runs do not nest: skip checkpoints/ and tensorboard/
        runs.append(_read_run(root, pathlib.Path(dirpath)))
    seen = {r.path for r in runs}
    not_started = []
    for folder in manifests:
        manifest = json.loads((folder / sweeps.MANIFEST_FILE).read_text())
        for planned in manifest["runs"]:
            path = _relative(root, folder / planned["workdir"])
            if path not in seen:
                not_started.append(f"`{path}`: {planned['setting']} seed {planned['seed']}")
    return runs, not_started


def _relative(root, path) -> str:
    return pathlib.Path(os.path.relpath(path, root)).as_posix()


def _read_run(root, folder) -> RunFiles:
    path, note, results, config = _relative(root, folder), "", None, None
    try:
        if (folder / logs.RESULTS_FILE).exists():
            results = json.loads((folder / logs.RESULTS_FILE).read_text())
            config = results["config"]
        elif (folder / logs.CONFIG_FILE).exists():
            config = json.loads((folder / logs.CONFIG_FILE).read_text())
    except (ValueError, KeyError) as e:
        results, note = None, f"unreadable {logs.RESULTS_FILE} or {logs.CONFIG_FILE}: {e}"
    metrics = logs.read_metrics(folder)
    log = folder / sweeps.LOG_FILE
    if results is None and not note and log.exists():
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
        note = f"{sweeps.LOG_FILE}: {lines[-1]}" if lines else ""
    return RunFiles(path, config, results, metrics, note)


def group(runs: list[RunFiles]) -> dict[str, list[Setting]]:
    """Settings by dataset, each sorted by row and column; runs without a config are left out."""
    settings = {}
    for run in runs:
        if run.config is None:
            continue
        config = recipe.with_added(run.config)  # a field added since a run: at its old value
        key = json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True)
        setting = settings.setdefault(key, Setting(config))
        (setting.runs if run.results else setting.unfinished).append(run)
    tables = {}
    for setting in settings.values():
        tables.setdefault(setting.dataset, []).append(setting)
    for table in tables.values():
        _name_variants(table)
        table.sort(key=lambda s: (s.row, s.sort_key))
    return dict(sorted(tables.items()))


def _name_variants(table: list[Setting]):
    """Settings in the same cell differ in some fields: every setting of the table gets its
    values of those fields as a row label, so each cell holds one setting. A value that more
    than half of the table's settings share is left out of the labels, so an ablation (one
    change per setting) labels each row with its change alone and the recipe with none."""
    cells = {}
    for s in table:
        cells.setdefault((s.depth, s.column), []).append(s)
    fields = set()
    for alike in cells.values():
        flat = [recipe.flatten({k: v for k, v in s.config.items() if k != "seed"}) for s in alike]
        for a in flat[1:]:
            fields.update(recipe.differences(flat[0], a))
    values = [{k: json.dumps(recipe.flatten(s.config).get(k)) for k in fields} for s in table]
    majority = {}
    for k in fields:
        value, count = collections.Counter(v[k] for v in values).most_common(1)[0]
        if 2 * count > len(table):
            majority[k] = value
    for s, v in zip(table, values, strict=True):
        s.variant = ", ".join(f"{k}={v[k]}" for k in sorted(fields) if majority.get(k) != v[k])


def mean_std(values):
    """(mean, sample std or None for one value, n); (None, None, 0) for none."""
    if not values:
        return None, None, 0
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std, len(values)


EMA_TOP1 = "ema_top1_error"  # results.json's error of the weights' moving average
CURVE_COLUMNS = 4  # panels per row of the training-curve figure


def error_cell(setting: Setting | None, key="top1_error") -> str:
    if setting is None:
        return ""
    return values_cell(setting.values(key), len(setting.unfinished))


def values_cell(values, unfinished=0) -> str:
    """mean ± std (n=N[, +K unfinished]) of errors in %."""
    mean, std, n = mean_std(values)
    more = f", +{unfinished} unfinished" if unfinished else ""
    if n == 0:
        return f"- (n=0{more})"
    spread = f" ± {std:.2f}" if std is not None else ""
    return f"{mean:.2f}{spread} (n={n}{more})"


def _si(x) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def complexity_cell(setting: Setting | None) -> str:
    if setting is None or not setting.runs:
        return ""
    parts = []
    for key in ("params", "flops"):
        mean, std, _ = mean_std(setting.values(key))
        parts.append("-" if mean is None else _si(mean) + (f" ± {_si(std)}" if std else ""))
    return " / ".join(parts)


def _paper_cell(value) -> str:
    """As the paper prints it: one decimal (23.0), two where it has them (Table 7's 3.65)."""
    if value is None:
        return "-"
    text = f"{value:.2f}"
    return text[:-1] if text.endswith("0") else text


def layout(table: list[Setting]):
    """(rows, columns, {(row, column): setting}) of one dataset's table."""
    rows = sorted({s.row for s in table})
    columns = [c for _, c in sorted({(s.sort_key, s.column) for s in table})]
    return rows, columns, {(s.row, s.column): s for s in table}


def _row_label(row) -> str:
    depth, variant = row
    return f"{depth} ({variant})" if variant else str(depth)


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(root, tables, runs, not_started, plots, studies=()) -> str:
    finished = sum(r.results is not None for r in runs)
    out = [
        "# Sweep report",
        "",
        f"Runs under `{root}`: {finished} finished, {len(runs) - finished} unfinished, "
        f"{len(not_started)} not started. Cells: top-1 error (%) on the eval split at the end "
        "of training, mean ± sample standard deviation over the finished runs (seeds) of a "
        "setting, n of them; rows are depths, columns cardinality x bottleneck width (C x d); "
        "an EMA column, where runs kept one (config.ema_decay), is the same for the moving "
        "average of the weights.",
    ]
    for dataset, table in tables.items():
        rows, columns, cells = layout(table)
        header_paper, note = PAPER_COLUMNS[paper_kind(dataset)]
        # ResNeXt-50's figures stand beside another dataset's only as a trend across C x d
        # settings; with one setting (a depth study, say) there is no trend to show.
        paper = paper_kind(dataset) != "other" or len(columns) > 1
        # Runs with config.ema_decay also report the moving average's error, beside the raw.
        ema = any(s.values(EMA_TOP1) for s in table)
        header = ["depth"]
        for c in columns:
            header += [c] + ([f"{c} EMA"] if ema else []) + ([header_paper] if paper else [])
        body = []
        for row in rows:
            line = [_row_label(row)]
            for c in columns:
                s = cells.get((row, c))
                line += [error_cell(s)]
                line += [error_cell(s, EMA_TOP1)] if ema else []
                line += [_paper_cell(s.paper_top1()) if s else ""] if paper else []
            body.append(line)
        complexity = [[_row_label(row)] + [complexity_cell(cells.get((row, c))) for c in columns]
                      for row in rows]  # fmt: skip
        out += [
            "",
            f"## {dataset}",
            "",
            "### Top-1 error (%)",
            "",
            _md_table(header, body),
            "",
            f"{header_paper}: {note.format(dataset=dataset)}; '-' where the paper has none."
            if paper
            else "",
            "",
            "### Parameters / multiply-adds per image",
            "",
            _md_table(["depth", *columns], complexity),
            "",
            "Mean over the finished runs; ± the standard deviation where they differ.",
        ]
        for title, file in plots.get(dataset, []):
            out += ["", f"![{title}]({file})"]
        for study in studies:
            if study.dataset == dataset:
                out += ["", *study_markdown(study)]
    unfinished = [r for r in runs if r.results is None]
    if unfinished:
        out += ["", "## Unfinished runs (not averaged)", ""]
        out += [f"- {_describe_unfinished(r)}" for r in unfinished]
    if not_started:
        out += ["", "## Not started (planned in sweep.json)", ""]
        out += [f"- {line}" for line in not_started]
    return "\n".join(out) + "\n"


def _describe_unfinished(run: RunFiles) -> str:
    parts = []
    if run.config:
        model = variants.variant_name(ml_collections.ConfigDict(run.config["model"]))
        parts.append(f"{model} on {run.config['dataset']['name']}, seed {run.seed}")
    else:
        parts.append("no config.json (it stopped before training)")
    if run.metrics:
        last = run.metrics[-1]
        parts.append(f"step {last['step']} (epoch {last['epoch']:g})")
        evals = [m for m in run.metrics if m["split"] == "eval"]
        if evals:
            parts.append(f"last eval top-1 error {evals[-1]['top1_error']:.2f}%")
    if run.note:
        parts.append(run.note)
    return f"`{run.path}`: " + "; ".join(parts)


def _num(x) -> str:
    if x is None:
        return ""
    return str(x) if isinstance(x, int) else repr(round(float(x), 6))


def _csv(header, rows) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def table_csv(tables) -> str:
    """The Table 3 layout: a row per dataset and depth, four columns per C x d setting."""
    columns = [c for _, c in sorted({(s.sort_key, s.column) for t in tables.values() for s in t})]
    header = ["dataset", "depth", "variant", "paper_reference"]
    for c in columns:
        header += [f"{c} top1 mean", f"{c} top1 std", f"{c} n", f"{c} paper"]
    rows = []
    for dataset, table in tables.items():
        table_rows, _, cells = layout(table)
        for depth, variant in table_rows:
            line = [dataset, depth, variant, PAPER_COLUMNS[paper_kind(dataset)][0]]
            for c in columns:
                s = cells.get(((depth, variant), c))
                mean, std, n = mean_std(s.values("top1_error")) if s else (None, None, "")
                line += [_num(mean), _num(std), n, _num(s.paper_top1()) if s else ""]
            rows.append(line)
    return _csv(header, rows)


SETTING_STATS = ("top1_error", "top5_error", "best_top1_error", EMA_TOP1, "params", "flops",
                 "wall_time_s")  # fmt: skip


def settings_csv(tables) -> str:
    """One row per setting: mean and std of every figure results.json has, and the paper's."""
    header = ["dataset", "depth", "variant", "setting", "model", "n", "unfinished"]
    for key in SETTING_STATS:
        header += [f"{key}_mean", f"{key}_std"]
    header += ["paper_top1_error", "paper_reference"]
    rows = []
    for dataset, table in tables.items():
        for s in table:
            line = [dataset, s.depth, s.variant, s.column, s.model, len(s.runs), len(s.unfinished)]
            for key in SETTING_STATS:
                mean, std, _ = mean_std(s.values(key))
                line += [_num(mean), _num(std)]
            rows.append(line + [_num(s.paper_top1()), PAPER_COLUMNS[paper_kind(dataset)][0]])
    return _csv(header, rows)


def runs_csv(runs, not_started) -> str:
    keys = SETTING_STATS
    header = ["path", "status", "dataset", "model", "depth", "setting", "seed", *keys,
              "last_step", "last_epoch"]  # fmt: skip
    rows = []
    for r in runs:
        line = [r.path, "finished" if r.results else "unfinished"]
        if r.config:
            m = r.config["model"]
            line += [r.config["dataset"]["name"],
                     variants.variant_name(ml_collections.ConfigDict(m)), m["depth"],
                     f"{m['cardinality']}x{m['base_width']}d", r.seed]  # fmt: skip
        else:
            line += [""] * 5
        line += [_num((r.results or {}).get(k)) for k in keys]
        last = r.metrics[-1] if r.metrics else {}
        rows.append(line + [last.get("step", ""), _num(last.get("epoch"))])
    for planned in not_started:
        rows.append([planned.split("`")[1], "not started"] + [""] * (len(header) - 2))
    return _csv(header, rows)


def curves(setting: Setting, split: str) -> tuple[list, list]:
    """(epochs, top-1 error averaged over the setting's finished runs) of one metrics split."""
    by_epoch = {}
    for run in setting.runs:
        for row in run.metrics:
            if row["split"] == split and row.get("top1_error") is not None:
                by_epoch.setdefault(row["epoch"], []).append(row["top1_error"])
    epochs = sorted(by_epoch)
    return epochs, [statistics.fmean(by_epoch[e]) for e in epochs]


def plot_table(dataset, table, out_dir) -> list[tuple[str, str]]:
    """Top-1 error vs cardinality and Fig. 5-style error curves: [(title, file name)]."""
    plt = pyplot()

    rows, columns, cells = layout(table)
    if not any(s.runs for s in table):
        return []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    slug = config_files.slug(dataset)
    kind = paper_kind(dataset)
    written = []

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    paper_ax = ax.twinx() if kind == "other" else ax
    ticks = {}
    for i, row in enumerate(rows):
        color = colors[i % len(colors)]
        ours = [(cells[(row, c)], *mean_std(cells[(row, c)].values("top1_error")))
                for c in columns if (row, c) in cells]  # fmt: skip
        ours = [(s, m, sd) for s, m, sd, n in ours if n]
        for s, _, _ in ours:
            ticks.setdefault(s.sort_key[0], []).append(s.column)
        ax.errorbar([s.sort_key[0] for s, _, _ in ours], [m for _, m, _ in ours],
                    yerr=[sd or 0 for _, _, sd in ours], color=color, marker="o", capsize=3,
                    label=f"ours, depth {_row_label(row)}")  # fmt: skip
        if kind != "other":
            ref = [(s.sort_key[0], s.paper_top1()) for s, _, _ in ours if s.paper_top1()]
            if ref:
                paper_ax.plot(*zip(*ref, strict=True), color=color, marker="s", ls=":",
                              mfc="none", label=f"paper, depth {row[0]}")  # fmt: skip
    if kind == "other":
        ref = sorted({(s.sort_key[0], s.paper_top1()) for s in table if s.paper_top1()})
        if ref:
            paper_ax.plot(
                *zip(*ref, strict=True),
                color="gray",
                marker="s",
                ls=":",
                mfc="none",
                label="paper: ImageNet ResNeXt-50, same C x d (right axis)",
            )
            paper_ax.set_ylabel("paper's ImageNet top-1 error (%)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), ["/".join(dict.fromkeys(ticks[c])) for c in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("cardinality (setting C x d)")
    ax.set_ylabel(f"top-1 error on {dataset} (%)")
    ax.set_title(f"{dataset}: top-1 error vs cardinality (mean ± std over seeds)")
    axes = [ax] if paper_ax is ax else [ax, paper_ax]
    handles = [h for a in axes for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, loc="best", fontsize="small")
    _save_figure(
        fig, out_dir, f"top1_vs_cardinality_{slug}.png", "top-1 error vs cardinality", written
    )

    ncols = min(len(rows), CURVE_COLUMNS)  # a grid of panels, one per row of the table
    nrows = -(-len(rows) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(7.0, 5.2 * ncols), 4.2 * nrows),
                             squeeze=False, sharey=True)  # fmt: skip
    axes = axes.ravel()
    for ax in axes[len(rows) :]:
        ax.set_visible(False)
    for ax, row in zip(axes, rows, strict=False):
        for j, c in enumerate(columns):
            s = cells.get((row, c))
            if s is None or not s.runs:
                continue
            color = colors[j % len(colors)]
            ax.plot(*curves(s, "train"), color=color, lw=1, ls="--")
            ax.plot(*curves(s, "eval"), color=color, lw=2, label=f"{s.model} (n={len(s.runs)})")
        ax.set_title(textwrap.fill(f"depth {_row_label(row)}", 48), fontsize="medium")
        ax.set_xlabel("epoch")
        ax.legend(fontsize="small")
    for ax in axes[::ncols]:
        ax.set_ylabel("top-1 error (%): dashed train, solid eval")
    fig.suptitle(f"{dataset}: top-1 error during training, mean over seeds (cf. Fig. 5)")
    _save_figure(fig, out_dir, f"curves_{slug}.png", "train and eval top-1 error vs epoch", written)
    return written


# What a depth study's settings may differ in; every other field must be alike.
STUDY_FIELDS = ("model.depth", "model.stage_sizes", "model.shortcut")
NETS = {False: "plain", True: "residual"}  # by model.shortcut


@dataclasses.dataclass
class DepthStudy:
    """Plain and residual nets at several depths, all else alike (He et al. 2016, Fig. 6)."""

    dataset: str
    label: str  # the fields telling apart studies of one dataset ("" for the only one)
    cells: dict  # {(depth, shortcut): Setting}
    plots: list = dataclasses.field(default_factory=list)  # [(title, file name)]

    @property
    def depths(self):
        return sorted({depth for depth, _ in self.cells})

    @property
    def slug(self):
        return config_files.slug(f"{self.dataset}_{self.label}" if self.label else self.dataset)


def depth_studies(tables) -> list[DepthStudy]:
    """The depth studies among each dataset's settings (see the module docstring)."""
    studies = []
    for dataset, table in tables.items():
        groups = {}
        for s in table:
            flat = recipe.flatten({k: v for k, v in s.config.items() if k != "seed"})
            rest = {k: v for k, v in flat.items() if k not in STUDY_FIELDS}
            groups.setdefault(json.dumps(rest, sort_keys=True), []).append(s)
        found = [
            (json.loads(key), alike)
            for key, alike in groups.items()
            if {s.config["model"]["shortcut"] for s in alike} == {False, True}
            and len({s.depth for s in alike}) > 1
        ]
        fields = set()
        for rest, _ in found[1:]:
            fields.update(recipe.differences(found[0][0], rest))
        for rest, alike in found:
            label = ", ".join(f"{k}={json.dumps(rest.get(k))}" for k in sorted(fields))
            cells = {(s.depth, s.config["model"]["shortcut"]): s for s in alike}
            studies.append(DepthStudy(dataset, label, cells))
    return studies


def final_train_error(run: RunFiles):
    """The mean top-1 error of the train rows logged in a run's last epoch, or None.

    These are the running errors of training mode (augmented batches, BN batch statistics,
    weights changing over the epoch), as He et al.'s Fig. 6 thin curves, not a re-evaluation
    of the final weights on the training set.
    """
    rows = [r for r in run.metrics if r["split"] == "train" and r.get("top1_error") is not None]
    if not rows:
        return None
    last = math.ceil(rows[-1]["epoch"])
    return statistics.fmean(r["top1_error"] for r in rows if r["epoch"] > last - 1)


def train_errors(setting: Setting) -> list[float]:
    errors = (final_train_error(r) for r in setting.runs)
    return [e for e in errors if e is not None]


def study_markdown(study: DepthStudy) -> list[str]:
    """The plain vs residual table of one depth study, its notes and plots, as lines."""
    header = ["depth"] + [f"{NETS[sc]} {split}" for sc in (False, True)
                          for split in ("train", "test")]  # fmt: skip
    body = []
    for depth in study.depths:
        line = [str(depth)]
        for shortcut in (False, True):
            s = study.cells.get((depth, shortcut))
            if s is None:
                line += ["", ""]
                continue
            line += [values_cell(train_errors(s)),
                     values_cell(s.values("top1_error"), len(s.unfinished))]  # fmt: skip
        body.append(line)
    title = f"{study.dataset}{f' ({study.label})' if study.label else ''}"
    out = [
        f"### {title}: plain vs residual by depth (cf. He et al. 2016, Fig. 1 and Fig. 6)",
        "",
        _md_table(header, body),
        "",
        "Top-1 error (%), mean ± sample std over seeds (n). Train: the running training-mode "
        "error averaged over the train rows logged in each run's last epoch (as Fig. 6's thin "
        "curves), not a re-evaluation of the final weights. Test: results.json's top-1 error "
        "on the eval split at the end of training. Plain: model.shortcut=false.",
    ]
    for title, file in study.plots:
        out += ["", f"![{title}]({file})"]
    return out


def study_csv(studies) -> str:
    """One row per depth study cell: dataset, study, depth, net, n, train and test error."""
    header = ["dataset", "study", "depth", "net", "n", "unfinished", "train_top1_error_mean",
              "train_top1_error_std", "test_top1_error_mean", "test_top1_error_std"]  # fmt: skip
    rows = []
    for study in studies:
        for (depth, shortcut), s in sorted(study.cells.items()):
            train = mean_std(train_errors(s))
            test = mean_std(s.values("top1_error"))
            rows.append([study.dataset, study.label, depth, NETS[shortcut], len(s.runs),
                         len(s.unfinished), _num(train[0]), _num(train[1]), _num(test[0]),
                         _num(test[1])])  # fmt: skip
    return _csv(header, rows)


def plot_study(study: DepthStudy, out_dir) -> list[tuple[str, str]]:
    """Train and test error vs depth, and Fig. 6's curves: [(title, file name)]."""
    plt = pyplot()

    if not any(s.runs for s in study.cells.values()):
        return []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.2))
    for ax, split in zip(axes, ("train", "test"), strict=True):
        for shortcut, color in ((False, colors[3]), (True, colors[0])):
            points = []
            for depth in study.depths:
                s = study.cells.get((depth, shortcut))
                values = (
                    (train_errors(s) if split == "train" else s.values("top1_error")) if s else []
                )
                ax.scatter([depth] * len(values), values, color=color, alpha=0.3, s=14)
                if values:
                    points.append((depth, statistics.fmean(values)))
            if points:
                ax.plot(*zip(*points, strict=True), color=color, marker="o",
                        label=NETS[shortcut])  # fmt: skip
        ax.set_xticks(study.depths)
        ax.set_xlabel("depth (layers)")
        ax.set_ylabel(f"{split} top-1 error (%)")
        ax.set_title(f"{split} error" + (" (running, last epoch)" if split == "train" else ""))
        ax.legend(fontsize="small")
    fig.suptitle(f"{study.dataset}: error vs depth, mean over seeds (points: seeds)")
    _save_figure(
        fig,
        out_dir,
        f"error_vs_depth_{study.slug}.png",
        "train and test top-1 error vs depth, plain and residual",
        written,
    )

    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.2), sharey=True)
    for ax, shortcut in zip(axes, (False, True), strict=True):
        for i, depth in enumerate(study.depths):
            s = study.cells.get((depth, shortcut))
            if s is None or not s.runs:
                continue
            color = colors[i % len(colors)]
            ax.plot(*curves(s, "train"), color=color, lw=1, ls="--")
            ax.plot(*curves(s, "eval"), color=color, lw=2.2,
                    label=f"{NETS[shortcut]}-{depth} (n={len(s.runs)})")  # fmt: skip
        ax.set_title(NETS[shortcut])
        ax.set_xlabel("epoch")
        ax.legend(fontsize="small")
    axes[0].set_ylabel("top-1 error (%): dashed train, bold test")
    fig.suptitle(f"{study.dataset}: training curves, mean over seeds (cf. He et al. Fig. 6)")
    _save_figure(
        fig,
        out_dir,
        f"curves_by_depth_{study.slug}.png",
        "train (dashed) and test (bold) top-1 error vs epoch, by depth",
        written,
    )
    return written


def pyplot():
    """matplotlib's pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def save_figure(fig, path) -> pathlib.Path:
    """Lay out `fig`, write it to `path` and close it; the path."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return pathlib.Path(path)


def _save_figure(fig, out_dir, name, title, written):
    """Write `fig` as out_dir/name and list it as (title, name)."""
    save_figure(fig, pathlib.Path(out_dir) / name)
    written.append((title, name))


def write_report(root, out_dir, plots=True) -> dict[str, pathlib.Path]:
    """Write report.md, table.csv, settings.csv, runs.csv, depth_study.csv (if a depth study
    is among the runs) and the plots into `out_dir`."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, not_started = collect(root)
    tables = group(runs)
    studies = depth_studies(tables)
    in_study = {id(s) for study in studies for s in study.cells.values()}
    figures = {}
    if plots:
        for study in studies:
            study.plots = plot_study(study, out_dir)
        figures = {d: plot_table(d, t, out_dir) for d, t in tables.items()
                   if not all(id(s) in in_study for s in t)}  # fmt: skip
    files = {
        "report.md": markdown(root, tables, runs, not_started, figures, studies),
        "table.csv": table_csv(tables),
        "settings.csv": settings_csv(tables),
        "runs.csv": runs_csv(runs, not_started),
    }
    if studies:
        files["depth_study.csv"] = study_csv(studies)
    written = {}
    for name, text in files.items():
        (out_dir / name).write_text(text)
        written[name] = out_dir / name
    for figure in [*figures.values(), *(study.plots for study in studies)]:
        written.update({name: out_dir / name for _, name in figure})
    return written
