"""Evaluation counts every eval example exactly once, however its last batch is padded."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnext_jax.experiments import config_files
from resnext_jax.models import variants
from resnext_jax.training import steps

default = config_files.config_module("default")

EXAMPLES = 10
BATCH_SIZES = (4, 5, 16)  # 2 padded rows, none, 6


def _config(eval_batch_size):
    config = default.get_config()
    config.model = variants.model_config("_tiny_resnext")
    config.dataset.name = "synthetic"
    config.dataset.image_size = 8
    config.dataset.num_train_examples = 16
    config.dataset.num_eval_examples = EXAMPLES
    config.batch_size = 16
    config.eval_batch_size = eval_batch_size
    config.lock()
    return config


def test_eval_step_sums_only_unmasked_rows():
    """Padded rows that the model gets right, with a small loss, add nothing to any sum."""
    logits = jnp.array([[0.0, 9.0], [9.0, 0.0], [9.0, 0.0], [9.0, 0.0]])
    batch = {
        "image": jnp.zeros((4, 1)),
        "label": jnp.array([1, 1, 0, 0]),  # row 0 right, row 1 wrong; padding right
        "mask": np.array([True, True, False, False]),
    }
    sums = steps.eval_step({}, batch, apply_fn=lambda variables, images, train: logits)
    expected_loss = float(
        optax.softmax_cross_entropy_with_integer_labels(logits[:2], batch["label"][:2]).sum()
    )
    assert float(sums["examples"]) == 2
    assert float(sums["loss"]) == pytest.approx(expected_loss, rel=1e-6)
    assert float(sums["top1_correct"]) == 1
    assert float(sums["top5_correct"]) == 2  # 2 classes: every label is in the top 5


@pytest.fixture(scope="module")
def source_and_variables():
    """The eval set of a tiny ResNeXt whose example 0, the one padding repeats, it gets right.

    In-memory sources pad a batch with copies of example 0; were it wrong, counting the
    padding would leave the number of correct answers unchanged and the test blind.
    """
    run = steps.build_run(_config(BATCH_SIZES[0]))
    state = steps.create_train_state(run, optax.sgd(0.1), jax.random.key(0))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    source = run.source
    images = next(source.eval_batches(EXAMPLES))["image"]  # all of them, no padding
    logits = np.asarray(run.model.apply(variables, images, train=False))
    source.eval_labels = source.eval_labels.copy()
    source.eval_labels[0] = logits[0].argmax()
    return source, variables, logits


def test_metrics_do_not_depend_on_the_eval_batch_size(source_and_variables):
    source, variables, logits = source_and_variables
    labels = source.eval_labels
    ranks = (logits > logits[np.arange(EXAMPLES), labels][:, None]).sum(-1)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    expected = {
        "loss": float(np.mean(loss)),
        "top1_error": 100 * float(np.mean(ranks >= 1)),
        "top5_error": 100 * float(np.mean(ranks >= 5)),
        "examples": EXAMPLES,
    }
    assert 0 < expected["top1_error"] < 100  # example 0 right, not every example
    for eval_batch_size in BATCH_SIZES:
        run = dataclasses.replace(steps.build_run(_config(eval_batch_size)), source=source)
        metrics = steps.evaluate(run, jax.device_put(variables, run.replicated))
        assert metrics["examples"] == EXAMPLES, eval_batch_size
        for key in ("loss", "top1_error", "top5_error"):
            np.testing.assert_allclose(
                metrics[key], expected[key], rtol=1e-6, atol=1e-6,
                err_msg=f"{key} at eval_batch_size={eval_batch_size}",
            )  # fmt: skip


def test_flip_eval_ranks_the_mean_probabilities_of_an_image_and_its_mirror():
    """A model that reads the image's one row as logits (plus a bias): mirrored, the image votes
    for another class, and the averaged distribution, not either vote, decides."""
    image = jnp.array([2.0, 0.0, 0.0]).reshape(1, 1, 3, 1)  # NHWC, width 3
    bias = jnp.array([0.0, 0.0, 0.5])
    batch = {"image": image, "label": jnp.array([0]), "mask": np.array([True])}

    def apply_fn(variables, images, train):
        return images[:, 0, :, 0] + bias

    plain = steps.eval_step({}, batch, apply_fn=apply_fn)
    flipped = steps.eval_step({}, batch, apply_fn=apply_fn, flip=True)
    probs = jax.nn.softmax(np.array([2.0, 0.0, 0.5])) + jax.nn.softmax(np.array([0.0, 0.0, 2.5]))
    probs = np.asarray(probs) / 2
    assert float(plain["top1_correct"]) == 1  # class 0 alone
    assert float(flipped["top1_correct"]) == 0  # the mean favours class 2
    assert probs.argmax() == 2
    assert float(flipped["loss"]) == pytest.approx(-np.log(probs[0]), rel=1e-5)


def test_eval_flip_config_evaluates_each_image_and_its_mirror(source_and_variables):
    source, variables, logits = source_and_variables
    config = _config(BATCH_SIZES[1])
    with config.unlocked():
        config.eval_flip = True
    run = dataclasses.replace(steps.build_run(config), source=source)
    images = next(source.eval_batches(EXAMPLES))["image"]
    mirrored = np.asarray(run.model.apply(variables, images[:, :, ::-1], train=False))
    assert not np.allclose(mirrored, logits)  # the tiny model is not mirror-symmetric
    probs = (jax.nn.softmax(logits, -1) + jax.nn.softmax(mirrored, -1)) / 2
    labels = source.eval_labels
    expected_loss = float(np.mean(-np.log(np.asarray(probs)[np.arange(EXAMPLES), labels])))
    expected_top1 = 100 * float(np.mean(np.asarray(probs).argmax(-1) != labels))
    metrics = steps.evaluate(run, jax.device_put(variables, run.replicated))
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["top1_error"], expected_top1, atol=1e-6)
