"""The recipe checks: config validation, what a resumed run may change, damaged JSON lines."""

import json

import pytest

from resnext_jax.experiments import config_files
from resnext_jax.training import logs, recipe

default = config_files.config_module("default")


def config_dict(**changes):
    config = default.get_config()
    for key, value in changes.items():
        *path, last = key.split(".")
        target = config
        for part in path:
            target = target[part]
        target[last] = value
    return config


@pytest.mark.parametrize(
    "field, value",
    [("log_every_steps", 0), ("checkpoint_every_steps", 0), ("eval_every_epochs", 0.0),
     ("batch_size", 0), ("eval_batch_size", -1), ("keep_checkpoints", 0), ("num_epochs", 0.0),
     ("max_steps", -1), ("learning_rate", -0.1), ("momentum", 1.0), ("lr_schedule", "linear"),
     ("dataset.bad_examples", "ignore"), ("label_smoothing", 1.0)],
)  # fmt: skip
def test_validate_names_the_field_and_what_it_takes(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r} \(must be"):
        recipe.validate(config_dict(**{field: value}))


def test_validate_lists_every_bad_field_at_once():
    with pytest.raises(ValueError) as e:
        recipe.validate(config_dict(log_every_steps=0, checkpoint_every_steps=0))
    assert "log_every_steps=0" in str(e.value) and "checkpoint_every_steps=0" in str(e.value)
    recipe.validate(default.get_config())  # the base config passes


def as_json(config):
    return json.loads(config.to_json())


def test_compare_splits_experiment_fields_from_free_ones():
    old = as_json(config_dict())
    new = as_json(
        config_dict(
            learning_rate=0.7,
            batch_size=64,
            seed=5,
            log_every_steps=1,
            max_steps=9,
            **{"model.cardinality": 8, "dataset.workers": 3},
        )
    )
    changed, free = recipe.compare(old, new)
    assert changed == {"batch_size": (256, 64), "learning_rate": (0.1, 0.7), "seed": (0, 5),
                       "model.cardinality": (1, 8)}  # fmt: skip
    assert free == {"log_every_steps": (100, 1), "max_steps": (0, 9), "dataset.workers": (0, 3)}
    # More epochs under step decay only lengthen the run; under cosine they reshape every
    # step's learning rate; a finished run's length is part of its experiment.
    longer = as_json(config_dict(num_epochs=200.0))
    assert recipe.compare(old, longer) == ({}, {"num_epochs": (100.0, 200.0)})
    assert recipe.compare(old, longer, finished=True)[0] == {"num_epochs": (100.0, 200.0)}
    cosine = as_json(config_dict(lr_schedule="cosine"))
    assert "num_epochs" in recipe.compare(cosine, dict(cosine, num_epochs=200.0))[0]
    # A field the workdir's config predates is named as absent there.
    del old["dataset"]["bad_examples"]
    assert recipe.compare(old, as_json(config_dict()))[1] == {
        "dataset.bad_examples": (recipe.ABSENT, "error")
    }
    # Tuples and the lists JSON reads them back as are the same value.
    assert recipe.differences({"a": (1, 2)}, {"a": [1, 2]}) == {}


def test_check_resume_refuses_accepts_and_records(tmp_path):
    old = as_json(config_dict())
    logs.write_json(tmp_path / logs.CONFIG_FILE, old)
    assert recipe.check_resume(tmp_path, old, 10) == ({}, {})  # the same recipe
    assert recipe.record(tmp_path, 10, {}, {}) == ""  # nothing to say or record
    assert not (tmp_path / recipe.HISTORY_FILE).exists()

    new = dict(old, learning_rate=0.7, log_every_steps=5)
    with pytest.raises(recipe.ConfigMismatchError) as e:
        recipe.check_resume(tmp_path, new, 10)
    message = str(e.value)
    assert "learning_rate: 0.1 in the workdir, 0.7 now" in message
    assert "log_every_steps" not in message and "--accept_config_change" in message
    assert not (tmp_path / recipe.HISTORY_FILE).exists()

    said = [recipe.record(tmp_path, 10, *recipe.check_resume(tmp_path, new, 10, accept=True))]
    changes = recipe.check_resume(tmp_path, dict(old, log_every_steps=5), 20)
    said.append(recipe.record(tmp_path, 20, *changes))
    history = recipe.read_history(tmp_path)
    assert [(h["step"], h["accepted"]) for h in history] == [(10, ["learning_rate"]), (20, [])]
    assert history[0]["changes"] == {"learning_rate": [0.1, 0.7], "log_every_steps": [100, 5]}
    assert "learning_rate: 0.1 in the workdir, 0.7 now" in said[0]


def test_check_resume_names_an_unreadable_config_json(tmp_path):
    (tmp_path / logs.CONFIG_FILE).write_text('{"batch_size": 25')
    with pytest.raises(recipe.ConfigMismatchError, match="config.json is unreadable"):
        recipe.check_resume(tmp_path, {}, 3)


def test_damaged_metrics_lines_are_left_out_and_named(tmp_path, capsys):
    rows = [{"split": "train", "step": s, "loss": 1.0} for s in (1, 2, 3, 4)]
    lines = [json.dumps(r) for r in rows]
    torn = lines[1][:17]  # a write cut short, then the next row appended to it
    text = f"{lines[0]}\n{torn}{lines[2]}\n\0\0\0\0\n{lines[3]}\n{lines[3][:-5]}"
    (tmp_path / logs.METRICS_FILE).write_bytes(text.encode() + b"\xff\n")
    assert logs.read_metrics(tmp_path) == [rows[0], rows[3]]
    err = capsys.readouterr().err
    assert "metrics.jsonl: left out 3 damaged line(s) (2, 3, 5)" in err

    # A resumed run rewrites the history it keeps (atomically), dropping the damage.
    reporter = logs.Reporter(tmp_path, 10, 5, 8, resume_step=4)
    reporter.write("train", 5, loss=0.5)
    reporter.close()
    assert [r["step"] for r in logs.read_metrics(tmp_path)] == [1, 4, 5]
    assert not list(tmp_path.glob(".*.tmp"))


def test_fields_added_since_a_run_began_at_their_defaults_change_nothing():
    old = as_json(config_dict())
    del old["ema_decay"], old["model"]["drop_path_rate"], old["dataset"]["randaugment_n"]
    new = as_json(config_dict())
    added = {"ema_decay": (recipe.ABSENT, 0.0), "model.drop_path_rate": (recipe.ABSENT, 0.0),
             "dataset.randaugment_n": (recipe.ABSENT, 0)}  # fmt: skip
    assert recipe.compare(old, new) == ({}, added)  # recorded in history.jsonl, not refused
    defaults = recipe.flatten(as_json(config_dict()))
    assert {k: defaults[k] for k in recipe.ADDED} == recipe.ADDED  # configs/default.py's values
    new["ema_decay"] = 0.99  # not the default: a change to the experiment
    changed, _ = recipe.compare(old, new)
    assert changed == {"ema_decay": (recipe.ABSENT, 0.99)}
