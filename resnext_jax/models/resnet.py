"""ResNet and ResNeXt (Xie et al. 2017, "Aggregated Residual Transformations") in Flax linen.

Layer names map one to one onto torchvision's state_dict keys:

    stem_conv, stem_bn          <->  conv1, bn1
    stage{i}_block{j}/convK     <->  layer{i}.{j}.convK        (bnK likewise)
    stage{i}_block{j}/proj_conv <->  layer{i}.{j}.downsample.0 (proj_bn: downsample.1)
    head                        <->  fc

Two hooks for resnext_jax/experiments/analysis.py leave outputs and variables unchanged when
unused: `lesioned` names blocks whose residual branch is removed (Veit et al. 2016), and the
input of every block passes through `perturb` (its gradient is d loss / d input when a
"perturbations" collection is passed to `apply`; `init` creates none).
"""

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnext_jax.devices import parallel
from resnext_jax.ops import onednn
from resnext_jax.ops.activation import relu
from resnext_jax.ops.conv import Conv, dense_impl, onednn_on_this_backend, uses_onednn

ModuleDef = Any

# Fig. 3 of the paper: three equivalent forms of the aggregated transformation.
BLOCK_FORMS = ("grouped", "paths", "concat")


class BatchNorm(nn.Module):
    """Batch norm whose batch statistics come from groups of `group_size` images.

    Normalizing over a fixed number of images (the paper's 32 per GPU) rather than over
    whatever a device holds keeps a result independent of the device count. Parameter and
    statistic names (scale, bias, mean, var) are flax.linen.BatchNorm's.

    Inside a per-device step (`axis_name`: the mesh axis, resnext_jax.devices.parallel) a group lies
    within one device's images, so the batch statistics move nothing between devices; only a
    group as large as the whole global batch (`group_size` 0 or at least the batch) averages
    its moments over the devices. The running averages are averaged over the devices, which
    keeps them replicated and equal to those of one device holding the whole batch.

    `impl`: "auto" computes a training-mode float32 or bfloat16 batch norm over one group per
    device with resnext_jax.ops.onednn.batch_norm (this project's own kernel, or oneDNN's
    batch-norm primitives; `onednn_batch_norm_pays`) where the `onednn` conv impl can run;
    anything else, and "xla", computes it in jax.numpy (in float32, the output cast to `dtype`).
    `relu` applies a ReLU to the output; `add` (at call time) adds a tensor before it.
    """

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    group_size: int | None = None
    axis_name: str | None = None
    dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones
    impl: str = "auto"
    relu: bool = False  # ReLU the output (oneDNN applies it in the same pass)

    @nn.compact
    def __call__(self, x, add=None, conv=None):
        """Normalize `x`; with `add` (needs `relu`), relu(normalized + add): a block's end.

        With `conv` (a `Conv` module), normalize `conv(x)`: in inference, where
        `conv.takes_affine` says so, the conv, this batch norm, `add` and the ReLU run as one
        oneDNN call (resnext_jax.ops.onednn.conv_affine) instead of a conv and a pass over its
        output: the same arithmetic but for one rounding (the product x * mul is rounded before
        the shift is added, where XLA's fused multiply-add rounds once).
        """
        if add is not None and not self.relu:
            raise ValueError("BatchNorm adds a tensor only before its ReLU (relu=True)")
        features = x.shape[-1] if conv is None else conv.features
        scale = self.param("scale", self.scale_init, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if self.use_running_average:
            mul = scale * lax.rsqrt(ra_var.value + self.epsilon)
            shift = bias - ra_mean.value * mul
            if conv is not None and conv.dtype == self.dtype and conv.takes_affine(x, add):
                return conv(x, affine=(mul, shift), add=add, relu=self.relu)
            x = x if conv is None else conv(x)
            return self._activate((x.astype(jnp.float32) * mul + shift).astype(self.dtype), add)
        x = x if conv is None else conv(x)
        x32 = x.astype(jnp.float32)

        batch = x.shape[0]
        devices = parallel.axis_devices(self.axis_name)
        group, across_devices = bn_group(batch, devices, self.group_size)
        if not across_devices and batch % group:
            raise ValueError(
                f"batch norm over groups of {group} images needs each device's batch to be "
                f"divisible by {group}, got {batch} images on each of {devices} device(s); change "
                "the batch size or model.bn_group_size (a group never spans devices, except "
                "the whole batch: bn_group_size=0)"
            )
        native = onednn_dtype(x.dtype) and x.dtype == self.dtype
        native = native and (add is None or add.dtype == x.dtype)
        if self.impl == "auto" and native and not across_devices:
            if onednn_batch_norm_pays(batch // group, x.dtype) and onednn_on_this_backend():
                y, mean, var = onednn.batch_norm(
                    x, scale, bias, batch // group, self.epsilon, relu=self.relu, add=add
                )
                self._update_averages(ra_mean, ra_var, mean, var, across_devices)
                return y
        xg = x32.reshape(batch // group, -1, features)
        mean = jnp.mean(xg, axis=1, keepdims=True)
        mean_square = jnp.mean(jnp.square(xg), axis=1, keepdims=True)
        if across_devices:
            mean, mean_square = parallel.pmean((mean, mean_square), self.axis_name)
        # One pass over the activations (E[x^2] - E[x]^2), as flax does; clipped at 0.
        var = jnp.maximum(mean_square - jnp.square(mean), 0)
        self._update_averages(ra_mean, ra_var, mean[:, 0], var[:, 0], across_devices)
        mul = scale * lax.rsqrt(var + self.epsilon)
        y = xg * mul + (bias - mean * mul)
        return self._activate(y.reshape(x.shape).astype(self.dtype), add)

    def _activate(self, y, add):
        if add is not None:
            y = y + add
        return relu(y) if self.relu else y

    def _update_averages(self, ra_mean, ra_var, mean, var, across_devices):
        """Move the running averages toward the groups' mean moments ((groups, features))."""
        if self.is_initializing():
            return
        batch_mean, batch_var = jnp.mean(mean, axis=0), jnp.mean(var, axis=0)
        if self.axis_name and not across_devices:
            batch_mean, batch_var = parallel.pmean((batch_mean, batch_var), self.axis_name)
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * batch_mean
        ra_var.value = m * ra_var.value + (1 - m) * batch_var


def bn_group(batch: int, devices: int, group_size: int | None) -> tuple[int, bool]:
    """(images per batch statistic within a device, whether moments are averaged across
    devices) for a device batch of `batch` images on `devices` devices (BatchNorm's rule)."""
    total = batch * devices
    group = total if not group_size or total <= group_size else group_size
    if group == total and devices > 1:
        return batch, True
    return group, False


def onednn_batch_norm_pays(groups: int, dtype=jnp.float32) -> bool:
    """Whether oneDNN's batch norm (and with it the dense convs) beats XLA's for a device batch
    split into `groups` groups, computing in `dtype`.

    float32, one group: oneDNN, 1.3-1.8x as fast alone in scripts/bench_norm.py's table and
    faster in ResNet-50's step. float32, several groups: about even alone, but the offline
    default's step (4 groups of 32) took longer with it, one call per group and nothing left for
    XLA to fuse. bfloat16: oneDNN at any number of groups, since XLA's CPU convs and norms do
    not use the CPU's bfloat16 instructions and the offline default's step is faster with
    oneDNN's (docs/benchmarks.md, "Batch norm through oneDNN" and "bfloat16 on CPU").
    """
    return groups == 1 or jnp.dtype(dtype) == jnp.bfloat16


def onednn_dtype(dtype) -> bool:
    """Whether oneDNN's batch norm and pooling run this compute dtype as it is: float32, or
    bfloat16 where this backend is a CPU whose oneDNN has bfloat16 kernels."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16:
        return onednn_on_this_backend() and onednn.bfloat16_native()
    return dtype == jnp.float32


def max_pool(x, window, strides, padding, dtype, onednn_ok=True):
    """The stem's max pool: oneDNN's on CPU in float32 or bfloat16 where it is built
    (`onednn_ok`: the model's conv_impl allows it), flax's otherwise. Padding never wins in
    either."""
    if onednn_ok and x.dtype == dtype and onednn_dtype(dtype) and onednn_on_this_backend():
        return onednn.max_pool(x, window, strides, padding)
    pads = ((padding, padding), (padding, padding))
    return nn.max_pool(x, (window, window), strides=(strides, strides), padding=pads)


def group_width(planes: int, base_width: int) -> int:
    """Width of one group at `planes` planes: floor(planes * d / 64), timm's rule."""
    return planes * base_width // 64


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    planes: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    shortcut: bool = True
    zero_init_last_bn: bool = False
    lesioned: bool = False
    drop_path: float = 0.0  # probability of dropping the residual branch (training only)
    axis_name: str | None = None  # the device axis, inside a per-device step
    expansion = 1

    @nn.compact
    def __call__(self, x):
        conv1 = self.conv(self.planes, 3, self.strides, name="conv1")
        y = self.norm(name="bn1", relu=True)(x, conv=conv1)
        last_norm = partial(self.norm, scale_init=_last_bn_init(self.zero_init_last_bn), name="bn2")
        return _add_shortcut(self, x, y, last_norm, self.conv(self.planes, 3, name="conv2"))


class Bottleneck(nn.Module):
    """1x1, 3x3 grouped into `cardinality` groups (stride here), 1x1: Fig. 3 of the paper.

    `form` picks one of Fig. 3's equivalent forms: "grouped" (c, the fast one), "concat"
    (b: C paths of 1x1-3x3 concatenated before one 1x1) or "paths" (a: C full 1x1-3x3-1x1
    paths summed). `resnext_jax.models.fig3` maps (c)'s parameters onto (a) and (b).
    """

    planes: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    cardinality: int = 1
    base_width: int = 64
    shortcut: bool = True
    zero_init_last_bn: bool = False
    lesioned: bool = False
    form: str = "grouped"
    drop_path: float = 0.0  # probability of dropping the residual branch (training only)
    axis_name: str | None = None  # the device axis, inside a per-device step
    expansion = 4

    @nn.compact
    def __call__(self, x):
        d = group_width(self.planes, self.base_width)
        out_features = self.planes * self.expansion
        if self.form == "grouped":
            width = d * self.cardinality
            y = self.norm(name="bn1", relu=True)(x, conv=self.conv(width, 1, name="conv1"))
            conv2 = self.conv(width, 3, self.strides, groups=self.cardinality, name="conv2")
            y = self.norm(name="bn2", relu=True)(y, conv=conv2)
            last_conv = self.conv(out_features, 1, name="conv3")  # y is its input
        elif self.form == "concat":
            y = jnp.concatenate(
                [self._path(x, d, name=f"path{i}") for i in range(self.cardinality)], axis=-1
            )
            last_conv = self.conv(out_features, 1, name="conv3")
        elif self.form == "paths":
            y = sum(
                self._path(x, d, name=f"path{i}", out_features=out_features)
                for i in range(self.cardinality)
            )
        else:
            raise ValueError(f"unknown block form {self.form!r}; choose one of {BLOCK_FORMS}")
        if self.form == "paths":
            last_conv = None  # y is the paths' sum, each path's last conv inside it
        last_norm = partial(self.norm, scale_init=_last_bn_init(self.zero_init_last_bn), name="bn3")
        return _add_shortcut(self, x, y, last_norm, last_conv)

    def _path(self, x, d, name, out_features=0):
        return _Path(d, self.strides, self.conv, self.norm, out_features, name=name)(x)


class _Path(nn.Module):
    """One of Fig. 3's C paths: 1x1 to d channels, a dense 3x3, and in form (a) a 1x1 out."""

    width: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    out_features: int = 0

    @nn.compact
    def __call__(self, x):
        y = self.norm(name="bn1", relu=True)(x, conv=self.conv(self.width, 1, name="conv1"))
        conv2 = self.conv(self.width, 3, self.strides, name="conv2")
        y = self.norm(name="bn2", relu=True)(y, conv=conv2)
        return self.conv(self.out_features, 1, name="conv3")(y) if self.out_features else y


def _last_bn_init(zero_init: bool) -> Callable:
    return nn.initializers.zeros if zero_init else nn.initializers.ones


def _add_shortcut(block, x, y, last_norm, last_conv=None):
    """The last conv and batch norm, the shortcut, the residual add and the ReLU after it.

    `y` is the residual branch before its last conv `last_conv` (a Conv module), or where
    there is none before its last batch norm; `last_norm` is that norm's module (partial), which
    also adds the shortcut and applies the ReLU (in inference, all of it one oneDNN call where
    `Conv.takes_affine`). A type-B projection only
    where the shape changes. A `lesioned` block drops its residual branch (its parameters stay,
    unused): the identity passes `x` on unchanged (x is post-ReLU), a projection block outputs
    its projection alone, and a plain block (no shortcut) becomes the identity where the shapes
    allow it (`BlockSpec.removable`).
    """
    if not block.shortcut:  # Section 5.1's ablation: no identity and no projection paths.
        if not block.lesioned:
            return last_norm(relu=True)(y, conv=last_conv)
        y = last_norm()(y, conv=last_conv)  # its parameters exist, as in the intact block
        if x.shape != y.shape:
            raise ValueError(
                f"{block.name}: a plain block that changes the shape from {x.shape} to "
                f"{y.shape} cannot be replaced by the identity"
            )
        return x
    out_features = block.planes * block.expansion
    if x.shape[-1] == out_features and block.strides == 1:
        residual = x
    else:
        proj_conv = block.conv(out_features, 1, block.strides, name="proj_conv")
        residual = block.norm(name="proj_bn")(x, conv=proj_conv)
    if block.lesioned:
        last_norm()(y, conv=last_conv)
        return x if residual is x else relu(residual)
    if block.drop_path > 0:
        y = drop_path(block, last_norm()(y, conv=last_conv), block.drop_path, block.axis_name)
        return relu(y + residual)
    return last_norm(relu=True)(y, add=residual, conv=last_conv)


def drop_path(module, y, rate, axis_name=None):
    """Stochastic depth (Huang et al. 2016, as timm's DropPath): each example's residual branch
    `y` is zeroed with probability `rate` and kept ones are scaled by 1 / (1 - rate).

    The draws come from `module`'s "drop_path" rng for the whole global batch, and each device
    keeps its rows' (inside a per-device step over `axis_name`, rows in device order), so an
    example's draw does not depend on the number of devices.
    """
    batch = y.shape[0]
    devices, first = 1, 0
    if axis_name:
        devices, first = lax.axis_size(axis_name), lax.axis_index(axis_name) * batch
    keep = jax.random.bernoulli(module.make_rng("drop_path"), 1 - rate, (devices * batch,))
    keep = lax.dynamic_slice_in_dim(keep, first, batch)
    scale = jnp.where(keep, 1 / (1 - rate), 0).astype(y.dtype)
    return y * scale.reshape(batch, *(1,) * (y.ndim - 1))


class BlockSpec(NamedTuple):
    """One residual block of a `ResNet`, in order: its name and shape."""

    name: str  # stage{i}_block{j}, the block's parameter scope
    index: int  # position from the input, 0-based
    planes: int
    strides: int
    in_features: int
    out_features: int
    shortcut: bool

    @property
    def changes_shape(self) -> bool:
        return self.strides != 1 or self.in_features != self.out_features

    @property
    def removable(self) -> bool:
        """Whether the block can be lesioned: always with shortcuts, else only as identity."""
        return self.shortcut or not self.changes_shape


def block_specs(model) -> list[BlockSpec]:
    """The blocks of `model` (a `ResNet`) in order, without tracing it."""
    expansion = (BasicBlock if model.block == "basic" else Bottleneck).expansion
    specs, features = [], model.stem_width
    for i, num_blocks in enumerate(model.stage_sizes):
        for j in range(num_blocks):
            planes = model.planes * 2**i
            strides = 2 if i > 0 and j == 0 else 1
            spec = BlockSpec(f"stage{i + 1}_block{j}", len(specs), planes, strides, features,
                             planes * expansion, model.shortcut)  # fmt: skip
            specs.append(spec)
            features = spec.out_features
    return specs


class ResNet(nn.Module):
    """ResNet / ResNeXt: a stem, stages of residual blocks, global average pool, linear head.

    Stage i has `planes * 2**i` planes and downsamples by 2 at its first block (except the
    first stage). ResNeXt is `block="bottleneck"` with `cardinality` C and `base_width` d.
    """

    stage_sizes: Sequence[int]
    block: str = "bottleneck"
    cardinality: int = 1
    base_width: int = 64
    num_classes: int = 1000
    stem: str = "imagenet"
    stem_width: int = 64
    stem_strides: int = 1
    planes: int = 64
    shortcut: bool = True
    zero_init_last_bn: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_group_size: int | None = None
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    form: str = "grouped"
    axis_name: str | None = None  # the device axis, inside a per-device step (BatchNorm)
    lesioned: tuple[str, ...] = ()  # names of blocks whose residual branch is removed
    # Stochastic depth in training: block i of n drops its branch with probability
    # drop_path_rate * i / (n - 1) (timm's linear rule: none at the first, the rate at the
    # last); needs a "drop_path" rng.
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        # oneDNN for the dense convs too where batch norm runs there (one group per device):
        # next to XLA's batch norm, XLA's own dense convs take its scale and ReLU into them.
        dense = dense_impl(self.conv_impl)
        if train:  # the batch statistics' groups (eval-mode batch norm is elementwise)
            devices = parallel.axis_devices(self.axis_name)
            group, across = bn_group(x.shape[0], devices, self.bn_group_size)
            native = onednn_dtype(self.dtype)
            pays = onednn_batch_norm_pays(x.shape[0] // group, self.dtype)
            if across or not native or not pays:
                dense = "xla_auto"
        conv = partial(Conv, dtype=self.dtype, impl=self.conv_impl, dense=dense)
        norm = partial(
            BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            group_size=self.bn_group_size,
            axis_name=self.axis_name,
            dtype=self.dtype,
            impl="auto" if uses_onednn(self.conv_impl) else "xla",
        )
        if self.stem == "imagenet":  # 7x7/2 conv, BN, ReLU, 3x3/2 max pool
            stem_conv = conv(self.stem_width, 7, 2, name="stem_conv")
            x = norm(name="stem_bn", relu=True)(x, conv=stem_conv)
            x = max_pool(x, 3, 2, 1, self.dtype, onednn_ok=uses_onednn(self.conv_impl))
        elif self.stem == "cifar":  # 3x3 conv (stride `stem_strides`), BN, ReLU, no pooling
            stem_conv = conv(self.stem_width, 3, self.stem_strides, name="stem_conv")
            x = norm(name="stem_bn", relu=True)(x, conv=stem_conv)
        else:
            raise ValueError(f"unknown stem {self.stem!r}; choose 'imagenet' or 'cifar'")

        if self.block == "basic":
            block = partial(BasicBlock, conv=conv, norm=norm)
        else:
            block = partial(
                Bottleneck,
                conv=conv,
                norm=norm,
                cardinality=self.cardinality,
                base_width=self.base_width,
                form=self.form,
            )
        specs = block_specs(self)
        unknown = set(self.lesioned) - {spec.name for spec in specs}
        if unknown:
            raise ValueError(f"lesioned blocks {sorted(unknown)} are not among {specs[0].name}"
                             f"..{specs[-1].name}")  # fmt: skip
        for i, spec in enumerate(specs):
            if not self.is_initializing():  # so init's variables hold no "perturbations"
                x = self.perturb(f"{spec.name}_input", x)
            rate = self.drop_path_rate * i / max(len(specs) - 1, 1) if train else 0.0
            x = block(
                planes=spec.planes,
                strides=spec.strides,
                shortcut=self.shortcut,
                zero_init_last_bn=self.zero_init_last_bn,
                lesioned=spec.name in self.lesioned,
                drop_path=rate,
                axis_name=self.axis_name,
                name=spec.name,
            )(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)
