"""Forward and backward passes of tiny variants, BN semantics, block structure."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnext_jax.models import fig3
from resnext_jax.models import resnet as models_resnet
from resnext_jax.models.resnet import BatchNorm
from resnext_jax.models.variants import build_model
from resnext_jax.ops.activation import relu
from resnext_jax.ops.conv import onednn_on_this_backend
from tests.conftest import init

TINY = {
    "basic": dict(name="_tiny_basic"),
    "bottleneck": dict(name="_tiny_bottleneck"),
    "grouped": dict(name="_tiny_resnext"),
    "imagenet_stem": dict(name="_tiny_imagenet_resnext"),
    "plain": dict(name="_tiny_resnext", shortcut=False),
    "depthwise": dict(name="_tiny_resnext", cardinality=8, base_width=8),
    "zero_init": dict(name="_tiny_resnext", zero_init_last_bn=True),
}


def _loss(model, variables, x, labels, train):
    def loss_fn(params):
        out = model.apply(
            {**variables, "params": params}, x, train=train,
            mutable=["batch_stats"] if train else False,
        )  # fmt: skip
        logits = out[0] if train else out
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), out

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])


# The ResNet blocks and the ImageNet stem compile longest: full suite only.
SLOW_VARIANTS = ("basic", "bottleneck", "imagenet_stem", "plain", "zero_init")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "variant",
    [pytest.param(v, marks=pytest.mark.slow) if v in SLOW_VARIANTS else v for v in TINY],
)
def test_forward_backward(variant, train, tiny_batch):
    kwargs = dict(TINY[variant])
    model = build_model(kwargs.pop("name"), **kwargs)
    variables = init(model, tiny_batch)
    labels = jnp.arange(4) % 10
    (loss, out), grads = _loss(model, variables, tiny_batch, labels, train)
    logits = out[0] if train else out
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    assert np.isfinite(loss)
    norms = jax.tree.map(lambda g: float(jnp.abs(g).sum()), grads)
    assert all(np.isfinite(n) for n in jax.tree.leaves(norms))
    if variant == "zero_init":  # the residual branches start silent: only bn3 learns at first
        assert norms["stage1_block0"]["bn3"]["scale"] > 0
        assert norms["stage1_block0"]["conv1"]["kernel"] == 0
    else:
        assert all(n > 0 for n in jax.tree.leaves(norms))
    if train:
        new_stats = out[1]["batch_stats"]
        changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                               new_stats)  # fmt: skip
        assert all(jax.tree.leaves(changed))


def test_block_structure_and_names():
    variables = jax.eval_shape(
        lambda: build_model("resnext50_32x4d").init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    )
    params = variables["params"]
    assert set(params) == {"stem_conv", "stem_bn", "head"} | {
        f"stage{i}_block{j}"
        for i, n in zip(range(1, 5), (3, 4, 6, 3), strict=True)
        for j in range(n)
    }
    first = params["stage2_block0"]
    assert set(first) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "proj_conv", "proj_bn"}
    # Group conv kernel: (3, 3, width / C, width) with width 256 = 32 x 8 in stage 2.
    assert first["conv2"]["kernel"].shape == (3, 3, 8, 256)
    assert first["conv1"]["kernel"].shape == (1, 1, 256, 256)
    assert first["conv3"]["kernel"].shape == (1, 1, 256, 512)
    assert "proj_conv" not in params["stage2_block1"]
    assert params["stem_conv"]["kernel"].shape == (7, 7, 3, 64)
    assert set(variables["batch_stats"]["stem_bn"]) == {"mean", "var"}


def test_plain_ablation_has_no_shortcut_params():
    variables = jax.eval_shape(
        lambda: build_model("resnext50_32x4d", shortcut=False).init(
            jax.random.key(0), jnp.zeros((1, 64, 64, 3))
        )
    )
    assert not any("proj_conv" in block for block in variables["params"].values())


def test_stride_on_grouped_3x3():
    model = build_model("_tiny_resnext")
    x = jnp.zeros((1, 16, 16, 3))
    shapes = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.name in ("conv1", "conv2"):
            shapes[context.module.path] = (args[0].shape[1], out.shape[1])
        return out

    import flax.linen as nn

    with nn.intercept_methods(record):
        model.init(jax.random.key(0), x)
    assert shapes[("stage2_block0", "conv1")] == (16, 16)
    assert shapes[("stage2_block0", "conv2")] == (16, 8)


def test_strided_cifar_stem_halves_the_feature_map():
    x = jnp.zeros((2, 28, 28, 1))
    features = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.name == "stem_conv":
            features["stem"] = out.shape
        return out

    import flax.linen as nn

    for strides, size in ((1, 28), (2, 14)):
        with nn.intercept_methods(record):
            init(build_model("_tiny_resnext", stem_strides=strides), x)
        assert features["stem"] == (2, size, size, 8)


@pytest.mark.slow
def test_zero_init_last_bn_and_he_fan_out_init():
    v = init(build_model("_tiny_resnext", zero_init_last_bn=True), jnp.zeros((2, 16, 16, 3)))
    assert float(jnp.abs(v["params"]["stage1_block0"]["bn3"]["scale"]).max()) == 0.0
    assert float(v["params"]["stage1_block0"]["bn1"]["scale"].min()) == 1.0
    # He fan-out: std sqrt(2 / (kh * kw * out)) for the (7, 7, 3, 64) stem.
    kernel = init(build_model("_tiny_imagenet_resnext", stem_width=64),
                  jnp.zeros((1, 32, 32, 3)))["params"]["stem_conv"]["kernel"]  # fmt: skip
    assert abs(float(kernel.std()) - np.sqrt(2 / (49 * 64))) < 0.1 * np.sqrt(2 / (49 * 64))


def test_grayscale_and_bfloat16():
    x = jnp.ones((2, 28, 28, 1))
    model = build_model("_tiny_resnext", dtype="bfloat16")
    variables = init(model, x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    assert variables["params"]["stem_conv"]["kernel"].shape[2] == 1
    logits = model.apply(variables, x)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_batch_norm_groups_normalize_each_group_alone():
    x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) * 3 + jnp.arange(8)[:, None, None, None]
    grouped = BatchNorm(group_size=4)
    variables = grouped.init(jax.random.key(0), x)
    y, stats = grouped.apply(variables, x, mutable=["batch_stats"])
    whole = BatchNorm(group_size=None)
    halves = [whole.apply(variables, x[i : i + 4], mutable=["batch_stats"]) for i in (0, 4)]
    np.testing.assert_allclose(y, jnp.concatenate([h[0] for h in halves]), atol=1e-5)
    mean_of_halves = (halves[0][1]["batch_stats"]["mean"] + halves[1][1]["batch_stats"]["mean"]) / 2
    np.testing.assert_allclose(stats["batch_stats"]["mean"], mean_of_halves, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        grouped.apply(variables, x[:6], mutable=["batch_stats"])


def test_batch_norm_eval_uses_running_statistics():
    x = jax.random.normal(jax.random.key(0), (4, 2, 2, 3))
    bn = BatchNorm(use_running_average=True, epsilon=0.0)
    stats = {"mean": jnp.array([1.0, 2.0, 3.0]), "var": jnp.array([4.0, 1.0, 0.25])}
    params = {"scale": jnp.array([1.0, 2.0, 3.0]), "bias": jnp.array([0.0, 1.0, -1.0])}
    y = bn.apply({"params": params, "batch_stats": stats}, x)
    expected = (x - stats["mean"]) / jnp.sqrt(stats["var"]) * params["scale"] + params["bias"]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # two models of every form: 15-30 s of compiling each
@pytest.mark.parametrize("form", ["paths", "concat"])
@pytest.mark.parametrize("cardinality,base_width", [(4, 16), (8, 8)], ids=["C4", "depthwise"])
def test_fig3_forms_are_equivalent(form, cardinality, base_width, tiny_batch):
    """Fig. 3: (a) summed paths, (b) concatenated paths and (c) grouped conv agree."""
    kw = dict(cardinality=cardinality, base_width=base_width)
    grouped = build_model("_tiny_resnext", **kw)
    other = build_model("_tiny_resnext", form=form, **kw)
    variables = init(grouped, tiny_batch)
    mapped = fig3.grouped_to_form(variables, form)
    own = init(other, tiny_batch)
    assert jax.tree.structure(mapped) == jax.tree.structure(own)
    assert jax.tree.map(jnp.shape, mapped) == jax.tree.map(jnp.shape, own)
    # Perturb BN statistics and affine params so that eval mode exercises them.
    keys = iter(jax.random.split(jax.random.key(2), 1000))
    variables = jax.tree.map(lambda a: a + 0.1 * jax.random.uniform(next(keys), a.shape),
                             variables)  # fmt: skip
    mapped = fig3.grouped_to_form(variables, form)
    np.testing.assert_allclose(
        other.apply(mapped, tiny_batch), grouped.apply(variables, tiny_batch), atol=2e-5
    )
    y_c, s_c = grouped.apply(variables, tiny_batch, train=True, mutable=["batch_stats"])
    y_o, s_o = other.apply(mapped, tiny_batch, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y_o, y_c, atol=2e-5)
    expected = fig3.grouped_to_form({"params": variables["params"], **s_c}, form)["batch_stats"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), s_o["batch_stats"],
                 expected)  # fmt: skip


def _module_calls(model, variables, x, substitute=None, **kwargs):
    """(the model's output, {module path: (input, output)} of every block and layer call);
    `substitute` {block name: array} feeds a block that array in place of its input."""
    import flax.linen as nn

    calls = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if substitute and context.module.name in substitute:
            args = (substitute[context.module.name], *args[1:])
        out = next_fun(*args, **kwargs)
        calls[context.module.path] = (args[0], out)
        return out

    with nn.intercept_methods(record):
        out = model.apply(variables, x, **kwargs)
    return out, calls


def test_a_lesioned_block_keeps_only_its_shortcut(tiny_batch):
    """Veit et al.'s lesion: identity blocks pass their input on exactly, projection blocks
    output relu(proj_bn(proj_conv(x))), with the same variables as the whole model."""
    model = build_model("_tiny_basic")
    variables = init(model, tiny_batch)
    whole, whole_calls = _module_calls(model, variables, tiny_batch)
    x, y = whole_calls[("stage1_block0",)]
    assert not np.array_equal(x, y)  # the branch does change the activations
    for name in ("stage1_block0", "stage2_block0"):
        lesioned = model.clone(lesioned=(name,))
        assert jax.tree.map(jnp.shape, init(lesioned, tiny_batch)) == jax.tree.map(
            jnp.shape, variables
        )
        out, calls = _module_calls(lesioned, variables, tiny_batch)
        assert not np.allclose(out, whole)
        x, y = calls[(name,)]
        if name == "stage1_block0":
            np.testing.assert_array_equal(y, x)
        else:
            projection = calls[(name, "proj_bn")][1]
            np.testing.assert_array_equal(y, jax.nn.relu(projection))
    with pytest.raises(ValueError, match=r"lesioned blocks \['stage3_block0'\] are not among"):
        model.clone(lesioned=("stage3_block0",)).apply(variables, tiny_batch)


def test_a_lesioned_plain_block_is_the_identity_where_shapes_allow(tiny_batch):
    from resnext_jax.models.resnet import block_specs

    model = build_model("_tiny_basic", shortcut=False)
    variables = init(model, tiny_batch)
    specs = block_specs(model)
    assert [(s.name, s.removable, s.changes_shape) for s in specs] == [
        ("stage1_block0", True, False),
        ("stage2_block0", False, True),
    ]
    _, calls = _module_calls(model.clone(lesioned=("stage1_block0",)), variables, tiny_batch)
    x, y = calls[("stage1_block0",)]
    np.testing.assert_array_equal(y, x)
    with pytest.raises(ValueError, match="cannot be replaced by the identity"):
        model.clone(lesioned=("stage2_block0",)).apply(variables, tiny_batch)
    residual = block_specs(build_model("_tiny_basic"))
    assert [s.removable for s in residual] == [True, True]


def test_block_input_perturbations_give_the_gradient_at_each_block_input(tiny_batch):
    """`init` and plain `apply` are unchanged; the gradient of a zero perturbation at a block's
    input equals jax.grad of the loss through that block's input fed in from outside."""
    from resnext_jax.models import inspector

    model = build_model("_tiny_resnext")
    variables = init(model, tiny_batch)
    assert set(variables) == {"params", "batch_stats"}
    labels = jnp.arange(4) % 10
    zeros = jax.tree.map(
        jnp.zeros_like,
        model.apply(variables, tiny_batch, train=True,
                    mutable=["perturbations", "batch_stats"])[1]["perturbations"],
    )  # fmt: skip
    assert set(zeros) == {"stage1_block0_input", "stage2_block0_input"}
    plain = model.apply(variables, tiny_batch)
    np.testing.assert_array_equal(model.apply({**variables, "perturbations": zeros}, tiny_batch),
                                  plain)  # fmt: skip
    assert inspector.param_count(model, tiny_batch.shape) == sum(
        p.size for p in jax.tree.leaves(variables["params"])
    )

    def loss(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def via_perturbation(p):
        v = {**variables, "perturbations": p}
        return loss(model.apply(v, tiny_batch, train=True, mutable=["batch_stats"])[0])

    grads = jax.grad(via_perturbation)(zeros)
    _, calls = _module_calls(model, variables, tiny_batch, train=True, mutable=["batch_stats"])
    for name in ("stage1_block0", "stage2_block0"):
        x = calls[(name,)][0]

        def via_input(x, name=name):
            out, _ = _module_calls(model, variables, tiny_batch, {name: x}, train=True,
                                   mutable=["batch_stats"])  # fmt: skip
            return loss(out[0])

        expected = jax.grad(via_input)(x)
        assert float(jnp.abs(expected).max()) > 0
        np.testing.assert_allclose(grads[f"{name}_input"], expected, rtol=1e-5, atol=1e-7)


def _relative_error(got, want) -> float:
    return float(jnp.linalg.norm((got - want).ravel()) / jnp.linalg.norm(want.ravel()))


needs_onednn_cpu = pytest.mark.skipif(
    not onednn_on_this_backend(), reason="oneDNN's kernels run on CPU where they are built"
)


@needs_onednn_cpu
@pytest.mark.parametrize(
    "variant,dtype",
    [("grouped", "float32"), ("plain", "float32"), ("grouped", "bfloat16"),
     ("imagenet_stem", "bfloat16"),
     pytest.param("bottleneck", "float32", marks=pytest.mark.slow),
     pytest.param("basic", "float32", marks=pytest.mark.slow)],
)  # fmt: skip
def test_onednn_layers_match_xla_in_training(variant, dtype, tiny_batch):
    """`auto` (oneDNN convs and batch norms with their ReLUs and residual adds, the ImageNet
    stem's max pool) against `xla_auto` (XLA alone): logits, loss gradients and the new running
    statistics, with BN over groups of 2 images (the ImageNet stem: 4 images at 64 px, so that
    its last stage's statistics come from more than 2 numbers each)."""
    kwargs = dict(TINY[variant])
    name = kwargs.pop("name")
    group = 2
    if variant == "imagenet_stem":
        tiny_batch, group = jax.random.normal(jax.random.key(1), (4, 64, 64, 3)), 4
    results = {}
    runs = [("auto", dtype), ("xla_auto", dtype)] + [("xla_auto", "float32")] * (dtype != "float32")
    for impl, compute in runs:
        model = build_model(name, conv_impl=impl, dtype=compute, bn_group_size=group, **kwargs)
        variables = init(model, tiny_batch)
        (_, (logits, new)), grads = _loss(model, variables, tiny_batch, jnp.arange(4), True)
        results[impl, compute] = jax.tree.leaves((logits, grads, new["batch_stats"]))
    for i, want in enumerate(results["xla_auto", "float32"]):
        got = results["auto", dtype][i]
        if dtype == "float32":
            scale = float(jnp.abs(want).max())
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)
        else:
            # Each layer matches XLA's bfloat16 layer to a rounding (tests/ops/test_onednn.py),
            # but across a tiny model whose batch norms see a few numbers each, roundings
            # that differ grow to tens of percent of a gradient, for XLA's own bfloat16 too:
            # auto's distance from float32 is held to XLA's.
            error = _relative_error(got, want)
            xla_error = _relative_error(results["xla_auto", dtype][i], want)
            assert error <= 2 * xla_error + 0.1, (i, error, xla_error)


def _random_norms(variables, key):
    """`variables` with every batch norm's scale, bias and running statistics drawn at random,
    so that an inference batch norm's shift is not zero and its scale not one."""
    leaves, tree = jax.tree.flatten_with_path(variables)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, leaf), k in zip(leaves, keys, strict=True):
        name = path[-1].key
        if name in ("scale", "var"):
            leaf = jax.random.uniform(k, leaf.shape, minval=0.5, maxval=1.5)
        elif name in ("mean", "bias") and leaf.ndim == 1 and "head" not in str(path):
            leaf = 0.2 * jax.random.normal(k, leaf.shape)
        out.append(leaf)
    return jax.tree.unflatten(tree, out)


@needs_onednn_cpu
@pytest.mark.parametrize(
    "variant,kwargs",
    [("grouped", {}), ("plain", {}), ("grouped", {"lesioned": ("stage2_block0",)}),
     ("grouped", {"dtype": "bfloat16"}),
     pytest.param("imagenet_stem", {}, marks=pytest.mark.slow),
     pytest.param("basic", {}, marks=pytest.mark.slow),
     pytest.param("grouped", {"form": "concat"}, marks=pytest.mark.slow),
     pytest.param("grouped", {"form": "paths"}, marks=pytest.mark.slow)],
)  # fmt: skip
def test_inference_runs_each_batch_norm_inside_its_conv(variant, kwargs, tiny_batch, monkeypatch):
    """In inference each conv but the narrow kernel's takes in its batch norm, residual add
    and ReLU (onednn.conv_affine); logits and input gradients match those of the layers run
    apart (RESNEXT_JAX_ONEDNN_AFFINE=0) and of XLA's (`xla_auto`) to a rounding; in bfloat16,
    where the layers run apart round three times more, those of the layers run apart to
    bfloat16's precision."""
    from resnext_jax.models import inspector
    from resnext_jax.ops import onednn

    base = dict(TINY[variant])
    name = base.pop("name")
    if variant == "imagenet_stem":
        tiny_batch = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    results = {}
    bfloat16 = kwargs.get("dtype") == "bfloat16"
    if bfloat16 and not onednn.bfloat16_native():
        pytest.skip("no bfloat16 kernels on this CPU")
    # In bfloat16, against float32: the fused and unfused layers' distances from it.
    runs = (("auto", "1"), ("auto", "0")) + (
        (("auto", "f32"),) if bfloat16 else (("xla_auto", "1"),)
    )
    for impl, fused in runs:
        monkeypatch.setenv(onednn.AFFINE_SWITCH, "0" if fused == "f32" else fused)
        dtype = {"dtype": "float32"} if fused == "f32" else {}
        model = build_model(name, conv_impl=impl, **base, **{**kwargs, **dtype})
        variables = _random_norms(init(model, tiny_batch), jax.random.key(2))

        def loss(x, model=model, variables=variables):
            return jnp.sum(jnp.sin(model.apply(variables, x, train=False)))

        hlo = jax.jit(loss).lower(tiny_batch).as_text()
        calls = hlo.count("custom_call @resnext_onednn_conv_affine")
        results[impl, fused] = (model.apply(variables, tiny_batch, train=False),
                                jax.jit(jax.grad(loss))(tiny_batch))  # fmt: skip
        if (impl, fused) == ("auto", "1"):
            # Each norm follows a conv, which takes it in unless the narrow kernel runs that
            # conv; Fig. 3(a)'s bn3 follows the paths' sum, and their last convs no norm.
            layers, _ = inspector.layers(model, tiny_batch.shape)
            paths = kwargs.get("form") == "paths"
            norms = [x.path[-1] for x in layers if isinstance(x.module, BatchNorm)]
            after_sum = norms.count("bn3") if paths else 0
            narrow = hlo.count("custom_call @resnext_onednn_narrow_conv(")
            plain = hlo.count("custom_call @resnext_onednn_conv_forward(")
            assert calls + narrow + after_sum == len(norms), (calls, narrow, norms)
            assert plain == (after_sum * model.cardinality if paths else 0)
        else:
            assert calls == 0
    want_logits, want_grad = results["auto", "0"]
    assert float(jnp.std(want_logits, axis=0).mean()) > 1e-3  # the images are told apart
    if bfloat16:  # the fused layers round less: no farther from float32 than the unfused
        for got, unfused, want in zip(results["auto", "1"], results["auto", "0"],
                                      results["auto", "f32"], strict=True):  # fmt: skip
            got, unfused = got.astype(jnp.float32), unfused.astype(jnp.float32)
            error, unfused_error = _relative_error(got, want), _relative_error(unfused, want)
            assert error <= 1.5 * unfused_error + 0.01, (error, unfused_error)
        return
    for got_logits, got_grad in (results["auto", "1"], results["xla_auto", "1"]):
        scale = float(jnp.abs(want_logits).max())
        np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5 * scale)
        scale = float(jnp.abs(want_grad).max())
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-4 * scale)


def test_relu_has_jax_nn_relus_gradient_bit_for_bit():
    x = jnp.array([-2.0, -0.0, 0.0, 1e-30, 3.0])
    dy = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])
    for f in (relu, jax.nn.relu):
        np.testing.assert_array_equal(f(x), jnp.maximum(x, 0))
    ours = jax.vjp(relu, x)[1](dy)[0]
    theirs = jax.vjp(jax.nn.relu, x)[1](dy)[0]
    np.testing.assert_array_equal(ours, theirs)


def _apply_train(model, variables, x, key):
    out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"],
                         rngs={"drop_path": key})  # fmt: skip
    return out


def test_drop_path_drops_whole_branches_in_training_only(tiny_batch):
    """Rate 0 is the plain model; in training a dropped branch leaves relu(shortcut), a kept
    one is scaled by 1 / (1 - rate); evaluation never drops."""
    plain = build_model("_tiny_resnext", bn_group_size=0)
    dropping = build_model("_tiny_resnext", bn_group_size=0, drop_path_rate=0.6)
    variables = init(plain, tiny_batch)
    key = jax.random.key(3)
    np.testing.assert_array_equal(dropping.apply(variables, tiny_batch),
                                  plain.apply(variables, tiny_batch))  # fmt: skip
    np.testing.assert_array_equal(
        _apply_train(build_model("_tiny_resnext", bn_group_size=0, drop_path_rate=0.0),
                     variables, tiny_batch, key),
        _apply_train(plain, variables, tiny_batch, key),
    )  # fmt: skip
    a = _apply_train(dropping, variables, tiny_batch, key)
    b = _apply_train(dropping, variables, tiny_batch, jax.random.key(4))
    assert not np.array_equal(a, b)  # other draws, other outputs

    # An identity block (the second of three, at rate 0.9 / 2): each example's output is its
    # input x (post-ReLU, so relu(x) = x) where the branch was dropped.
    deeper = dict(stage_sizes=(2, 1), depth=11, bn_group_size=0)
    dropping = build_model("_tiny_resnext", drop_path_rate=0.9, **deeper)
    variables = init(dropping, tiny_batch)
    specs = models_resnet.block_specs(dropping)
    before, last = specs[0].name, specs[1].name
    assert not specs[1].changes_shape
    _, state = dropping.apply(
        variables, tiny_batch, train=True, mutable=["batch_stats", "intermediates"],
        rngs={"drop_path": key}, capture_intermediates=lambda m, _: m.name in (before, last),
    )  # fmt: skip
    x = state["intermediates"][before]["__call__"][0]
    out = state["intermediates"][last]["__call__"][0]
    dropped = np.all(np.asarray(out) == np.asarray(x), axis=(1, 2, 3))
    assert dropped.any() and not dropped.all(), dropped


def test_drop_path_rates_rise_linearly_with_depth():
    model = build_model("_tiny_resnext", drop_path_rate=0.3)
    seen = {}

    def record(module, _):
        if isinstance(module, (models_resnet.Bottleneck, models_resnet.BasicBlock)):
            seen[module.name] = module.drop_path
        return False

    model.apply(init(model, jnp.zeros((2, 16, 16, 3))), jnp.zeros((2, 16, 16, 3)), train=True,
                mutable=["batch_stats", "intermediates"], rngs={"drop_path": jax.random.key(0)},
                capture_intermediates=record)  # fmt: skip
    rates = [seen[spec.name] for spec in models_resnet.block_specs(model)]
    np.testing.assert_allclose(rates, np.linspace(0, 0.3, len(rates)))
