"""Sweeps over a config family: one training run per setting and seed, each in its own workdir.

A family is a config file with `get_config(arg)` and `get_sweep()` (e.g. configs/table3.py);
`FAMILY:KEY=VALUE` fixes family arguments that get_sweep() does not vary (configs/table3.py:
recipe=a2 runs Table 3 under procedure A2). Run k of setting ARG is the command

    python scripts/train.py --config=FAMILY:ARG --workdir=ROOT/<ARG as a slug>/seed<k>
        --config.seed=k [--config.FIELD=VALUE ...]

A run whose workdir holds results.json is finished; any other is started there again, and
train.py resumes it from its latest checkpoint. `scripts/sweep.py` is the command line.
"""

import dataclasses
import json
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import warnings

from absl import flags
from ml_collections import config_flags

from resnext_jax.experiments import config_files
from resnext_jax.training import checkpoint, logs, recipe
from resnext_jax.training.preemption import Preemption

MANIFEST_FILE = "sweep.json"  # in the sweep's root: every planned run (scripts/report.py reads it)
LOG_FILE = "train.log"  # in each workdir: the output of every launch of that run, appended


# A command-line config override, passed on to every run of a sweep.
is_override = re.compile(r"--(no)?config\.").match


class SweepError(ValueError):
    """The family, the seeds or an override cannot make a sweep."""


@dataclasses.dataclass(frozen=True)
class SweepRun:
    setting: str  # the family's config argument, e.g. "depth=50,cw=32x4d"
    seed: int
    workdir: str  # as the command names it (relative to the directory commands run from)
    command: tuple[str, ...]
    config: dict  # the config the run trains, resolved as train.py resolves it, as JSON

    @property
    def label(self) -> str:
        return f"{self.setting or '(default)'} seed {self.seed}"

    def shell(self) -> str:
        return shlex.join(self.command)


def with_fixed(settings, fixed: str) -> list[str]:
    """Each setting followed by the `fixed` family arguments (`FAMILY:recipe=a2` sweeps every
    setting under that recipe); an argument both name is an error."""
    if not fixed:
        return settings
    keys = {item.partition("=")[0].strip() for item in fixed.split(",")}
    for setting in settings:
        both = keys & {item.partition("=")[0].strip() for item in setting.split(",")}
        if both:
            raise SweepError(f"the family's settings already vary {sorted(both)}; fix only "
                             "other keys after the colon")  # fmt: skip
    return [f"{s},{fixed}" if s else fixed for s in settings]


def family_settings(path) -> list[str]:
    """The config arguments of every setting of the family in `path` (its `get_sweep()`)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise SweepError(f"no config file {str(path)!r}")
    module = config_files.load_module(path)
    if not callable(getattr(module, "get_sweep", None)):
        raise SweepError(
            f"{path} is not a config family: it has no get_sweep(). A family defines "
            "get_config(arg) and get_sweep(), the list of its config arguments "
            "(see configs/table3.py)"
        )
    settings = list(module.get_sweep())
    if not settings:
        raise SweepError(f"{path}: get_sweep() lists no settings")
    slugs = [config_files.slug(s) for s in settings]
    if len(set(slugs)) != len(slugs):
        raise SweepError(f"{path}: get_sweep() repeats a setting: {settings}")
    return settings


def resolve_config(spec: str, seed: int, overrides=()) -> dict:
    """The config `train.py --config=SPEC --config.seed=SEED OVERRIDES` trains, as JSON.

    Parsed with ml_collections' config_flags, as train.py parses it, so a misspelled field or a
    bad value fails here, before any run starts.
    """
    argv = ["sweep", f"--config={spec}", f"--config.seed={seed}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "family config", flag_values=values,
                                    lock_config=True, sys_argv=argv)  # fmt: skip
    try:
        with warnings.catch_warnings():  # ml_collections loads config files with load_module()
            warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
            values(argv)
        config = values.config
        recipe.validate(config)
    except Exception as e:  # absl, ml_collections and the family raise many types
        message = e
        while isinstance(message, KeyError | AttributeError) and message.args:
            message = message.args[0]  # ml_collections wraps its message twice
        detail = f" with {' '.join(overrides)}" if overrides else ""
        raise SweepError(f"{spec}{detail}: {str(message).replace(chr(10), '; ')}") from e
    return json.loads(config.to_json())


def expand(config, seeds, root, overrides=(), python="python", train_script="scripts/train.py",
           cwd=".") -> list[SweepRun]:  # fmt: skip
    """Every run of the sweep: each setting of the family in `config` times seeds 0..seeds-1,
    seed-major.

    Paths are written into the commands as given; `cwd` is the directory the commands run from,
    against which relative paths are read here.
    """
    if seeds < 1:
        raise SweepError(f"--seeds={seeds}: a sweep needs at least one seed")
    config, _, fixed = config.partition(":")
    for item in overrides:
        if not is_override(item):
            raise SweepError(f"{item!r} is not a config override (--config.FIELD=VALUE)")
        if re.match(r"--(no)?config\.seed\b", item):
            raise SweepError(f"{item}: the sweep sets config.seed (use --seeds)")
    cwd = pathlib.Path(cwd)
    runs = []
    settings = with_fixed(family_settings(cwd / config), fixed)
    # Seed-major: every setting's seed 0 runs first, so a sweep cut short still covers them all.
    for seed in range(seeds):
        for setting in settings:
            spec = f"{config}:{setting}" if setting else config
            workdir = f"{root.rstrip('/')}/{config_files.slug(setting)}/seed{seed}"
            resolved = resolve_config(str(cwd / spec), seed, overrides)
            command = (python, train_script, f"--config={spec}", f"--workdir={workdir}",
                       f"--config.seed={seed}", *overrides)  # fmt: skip
            runs.append(SweepRun(setting, seed, workdir, command, resolved))
    return runs


def is_finished(workdir, cwd=".") -> bool:
    return (pathlib.Path(cwd) / workdir / logs.RESULTS_FILE).exists()


def write_manifest(root, runs, config, seeds, overrides, cwd="."):
    """ROOT/sweep.json: what the sweep plans, so a report can name the runs not started yet."""
    root_path = pathlib.Path(cwd) / root
    root_path.mkdir(parents=True, exist_ok=True)
    manifest = {
        "config": config,
        "seeds": seeds,
        "overrides": list(overrides),
        "runs": [
            {"setting": r.setting, "seed": r.seed,
             "workdir": str(pathlib.PurePath(r.workdir).relative_to(root)),
             "command": r.shell()}
            for r in runs
        ],
    }  # fmt: skip
    logs.write_json(root_path / MANIFEST_FILE, manifest)


def has_checkpoint(workdir, cwd=".") -> bool:
    """Whether a run's workdir holds a saved training step (it has trained under its config)."""
    folder = pathlib.Path(cwd) / workdir / checkpoint.CHECKPOINT_DIR
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def recipe_conflict(run, cwd=".") -> str:
    """Why `run` must not go on in its workdir ("" if it may): a finished run trained under
    another config than the sweep's, or an interrupted one that resuming would change."""
    workdir = pathlib.Path(cwd) / run.workdir
    finished = is_finished(run.workdir, cwd)
    if not finished and not has_checkpoint(run.workdir, cwd):
        return ""
    try:
        if finished:
            saved = json.loads((workdir / logs.RESULTS_FILE).read_text())["config"]
        else:
            saved = recipe.saved_config(workdir)
    except (ValueError, KeyError) as e:
        return f"its {logs.RESULTS_FILE if finished else logs.CONFIG_FILE} is unreadable ({e})"
    if saved is None:
        return ""
    changed, _ = recipe.compare(saved, run.config, finished=finished)
    if not changed:
        return ""
    what = "finished" if finished else "was started"
    fields = "; ".join(f"{k}: {json.dumps(a)} there, {json.dumps(b)} here"
                       for k, (a, b) in changed.items())  # fmt: skip
    return (f"it {what} under another config ({fields}); give this recipe another --root, or "
            "move that workdir aside")  # fmt: skip


@dataclasses.dataclass
class Outcome:
    run: SweepRun
    status: str  # "done before" (skipped), "finished", "failed", "stopped", "refused"
    detail: str = ""


def run_all(runs, cwd=".", out=None) -> list[Outcome]:
    """Run each unfinished run to its end, one after another; a failure does not stop the rest.

    SIGTERM (preemption) is passed on to the run in progress, which saves a checkpoint; the
    sweep then stops, and the same command resumes it.
    """
    out = out or sys.stdout
    launcher = _Launcher(cwd, out)
    outcomes = []
    with launcher:
        for i, run in enumerate(runs, 1):
            head = f"[{i}/{len(runs)}] {run.label}: {run.workdir}"
            conflict = recipe_conflict(run, cwd)
            if conflict:
                print(f"{head} refused: {conflict}", file=out, flush=True)
                outcomes.append(Outcome(run, "refused", conflict))
                continue
            if is_finished(run.workdir, cwd):
                print(f"{head} finished before, skipped", file=out, flush=True)
                outcomes.append(Outcome(run, "done before"))
                continue
            if launcher.stopping:
                outcomes.append(Outcome(run, "stopped", "not started: the sweep was stopped"))
                continue
            print(f"{head}\n$ {run.shell()}", file=out, flush=True)
            code, last = launcher.launch(run)
            if code == 0 and is_finished(run.workdir, cwd):
                outcomes.append(Outcome(run, "finished"))
            elif code == 0 or launcher.stopping:
                outcomes.append(Outcome(run, "stopped", last))
            else:
                outcomes.append(Outcome(run, "failed", f"exit status {code}: {last}"))
    return outcomes


class _Launcher:
    """Runs one command at a time, its output both on `out` and in the workdir's train.log.

    Inside `with`, SIGTERM is passed on to the run in progress and marks the sweep `stopping`.
    """

    def __init__(self, cwd, out):
        self.cwd, self.out = cwd, out
        self.proc = None
        self._interrupted = False
        self._guard = Preemption(on_signal=self._forward)

    @property
    def stopping(self) -> bool:
        return self._guard.requested or self._interrupted

    def __enter__(self):
        self._guard.__enter__()
        return self

    def __exit__(self, *exc):
        self._guard.__exit__(*exc)

    def _forward(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def launch(self, run) -> tuple[int, str]:
        """(exit status, last line of output)."""
        log_path = pathlib.Path(self.cwd) / run.workdir / LOG_FILE
        log_path.parent.mkdir(parents=True, exist_ok=True)
        last = ""
        with log_path.open("a") as log:
            log.write(f"$ {run.shell()}\n")
            log.flush()
            if self.stopping:  # SIGTERM came after run_all's check
                return 0, "not started: the sweep was stopped"
            # Undecodable bytes from the run (a stray binary line) must not kill the sweep and,
            # through a broken pipe, the run.
            self.proc = subprocess.Popen(run.command, cwd=self.cwd, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True,
                                         errors="replace")  # fmt: skip
            if self.stopping:  # SIGTERM came while it started: pass it on now
                self._forward()
            try:
                for line in self.proc.stdout:
                    self.out.write(line)
                    self.out.flush()
                    log.write(line)
                    log.flush()
                    last = line.strip() or last
                code = self.proc.wait()
            except KeyboardInterrupt:  # the run got the same Ctrl-C: wait for it, then stop
                self._interrupted = True
                code = self.proc.wait()
            finally:
                self.proc = None
        return code, last
