"""What a run leaves for people and tools: TensorBoard events, metrics.jsonl, a progress line.

metrics.jsonl has one JSON object per line:
    {"split": "train", "step", "epoch", "loss", "lr", "top1_error", "top5_error",
     "grad_norm", "images_per_sec"}   averaged over the steps since the previous train row
    {"split": "eval", "step", "epoch", "loss", "top1_error", "top5_error", "examples"}
          with config.ema_decay also "ema_loss", "ema_top1_error", "ema_top5_error" (the
          moving-average weights; results.json then adds "ema_top1_error", "ema_top5_error",
          "ema_eval_loss")
Errors are in percent; `step` counts optimizer steps done, `epoch` is step / steps per epoch.
"""

import json
import math
import os
import pathlib
import sys
import time

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
TENSORBOARD_DIR = "tensorboard"

# results.json: the keys later tools (scripts/report.py) may rely on.
RESULTS_KEYS = (
    "config", "model", "params", "flops", "seed", "devices", "batch_size", "epochs", "steps",
    "top1_error", "top5_error", "best_top1_error", "wall_time_s",
)  # fmt: skip


def read_metrics(workdir) -> list[dict]:
    """The rows of a workdir's metrics.jsonl (damaged lines left out, with a warning)."""
    return read_jsonl(pathlib.Path(workdir) / METRICS_FILE)


def read_jsonl(path, warn=True) -> list[dict]:
    """The JSON objects of a JSON-lines file, [] if there is none.

    A host crash or a full disk can leave a line torn, NUL-filled or glued to the next one;
    such lines are left out (and named on stderr) rather than failing every later reader.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return []
    rows, damaged = [], []
    text = path.read_bytes().decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step", 0), int):
            rows.append(row)
        else:
            damaged.append(number)
    if damaged and warn:
        print(f"warning: {path}: left out {len(damaged)} damaged line(s) "
              f"({', '.join(map(str, damaged[:5]))}{' ...' if len(damaged) > 5 else ''})",
              file=sys.stderr)  # fmt: skip
    return rows


def write_json(path, obj):
    """Write atomically, so a crash never leaves half a file where a finished one was."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path, text):
    """Write `text` to `path` atomically (a temporary file, synced, renamed over it)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class Reporter:
    """Writes metrics on process 0 only; the others stay silent."""

    def __init__(self, workdir, total_steps, steps_per_epoch, batch_size, enabled=True,
                 resume_step=0, redo_eval=False):  # fmt: skip
        self.workdir = pathlib.Path(workdir)
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        # Rows past the checkpoint we resume from describe steps that will run again, and so
        # does an evaluation of the checkpoint's own step that its meta does not hold.
        redo = {"eval"} if redo_eval else set()
        rows = [
            r
            for r in read_metrics(workdir)
            if r["step"] < resume_step or r["step"] == resume_step and r["split"] not in redo
        ]
        path = self.workdir / METRICS_FILE
        write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        self._file = path.open("a")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / TENSORBOARD_DIR))
        except ImportError:
            print("tensorboardX is not installed: no TensorBoard events", file=sys.stderr)

    def write(self, split, step, **values):
        if not self.enabled:
            return
        row = {"split": split, "step": step, "epoch": round(step / self.steps_per_epoch, 4)}
        row.update({k: _json_value(v) for k, v in values.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb:
            for key, value in values.items():
                if isinstance(value, int | float) and math.isfinite(value) and key != "examples":
                    self._tb.add_scalar(f"{split}/{key}", value, step)
            self._tb.flush()

    def progress(self, step, loss, top1_error, images_per_sec, lr):
        """One progress line: where the run is, how fast it goes, when it ends."""
        if not self.enabled:
            return
        rate = images_per_sec / self.batch_size  # steps per second
        left = (self.total_steps - step) / rate if rate > 0 else math.nan
        print(
            f"step {step}/{self.total_steps} (epoch {step / self.steps_per_epoch:.2f}) "
            f"loss {loss:.4f} top-1 err {top1_error:.2f}% lr {lr:.4g} | "
            f"{_number(images_per_sec)} img/s | ETA {_duration(left)}",
            flush=True,
        )

    def print(self, message):
        if self.enabled:
            print(message, flush=True)

    def close(self):
        if self.enabled:
            self._file.close()
            if self._tb:
                self._tb.close()


def _json_value(value):
    """JSON-ready: floats as floats, NaN (no measurement) as null."""
    if isinstance(value, int | str):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def _number(value):
    return f"{value:.0f}" if math.isfinite(value) else "?"


def _duration(seconds):
    if not math.isfinite(seconds):
        return "?"
    return time.strftime("%H:%M:%S", time.gmtime(seconds))
