"""The optimizer and learning-rate schedule, built from a training config.

`sgd` is the paper's (momentum, Nesterov in its code, L2 weight decay added to the gradient).
`adamw` and `lamb` are the ones of the "ResNet strikes back" recipes (Wightman et al. 2021,
timm's `AdamW` and `Lamb`), with decoupled weight decay.
"""

import jax
import optax

SCHEDULES = ("step", "cosine")
WEIGHT_DECAY_ON = ("all", "kernels")
OPTIMIZERS = ("sgd", "adamw", "lamb")


def scaled_learning_rate(config) -> float:
    """The linear scaling rule: `learning_rate` per `lr_batch_size` images."""
    return config.learning_rate * config.batch_size / config.lr_batch_size


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """Linear warmup from 0, then step decay (divide at `lr_drop_epochs`) or cosine down to
    `lr_min` (0 unless set)."""
    if config.lr_schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule={config.lr_schedule!r}; choose one of {SCHEDULES}")
    peak = scaled_learning_rate(config)
    warmup = round(config.warmup_epochs * steps_per_epoch)
    total = round(config.num_epochs * steps_per_epoch)
    if config.lr_schedule == "step":
        main = optax.piecewise_constant_schedule(
            peak,
            {
                round(e * steps_per_epoch) - warmup: config.lr_drop_factor
                for e in config.lr_drop_epochs
            },  # fmt: skip
        )
    else:
        floor = config.get("lr_min", 0.0)
        main = optax.cosine_decay_schedule(
            peak, max(total - warmup, 1), alpha=floor / peak if peak else 0.0
        )
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def kernel_mask(params):
    """True for conv and linear kernels: BN scales and biases get no weight decay."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def decay_mask(config):
    """The parameters weight decay applies to: a mask function, or None for all of them."""
    return kernel_mask if config.weight_decay_on == "kernels" else None


def create_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """The config's optimizer (`OPTIMIZERS`) under its learning-rate schedule.

    Gradient clipping (`grad_clip_norm`) acts on the loss gradient alone, before anything else.
    - `sgd`: the paper's Torch code: wd * param added to the gradient, then momentum (L2).
    - `adamw`: Adam, then decoupled decay (param -= lr * wd * param), as torch.optim.AdamW.
    - `lamb`: Adam's direction plus decoupled decay, scaled per parameter tensor by the trust
      ratio ||param|| / ||update|| (You et al. 2020), as timm's Lamb: the ratio applies where
      weight decay does (with `weight_decay_on=kernels`, not to BN parameters and biases).
    """
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={config.optimizer!r}; choose one of {OPTIMIZERS}")
    if config.weight_decay_on not in WEIGHT_DECAY_ON:
        raise ValueError(f"weight_decay_on={config.weight_decay_on!r}; choose {WEIGHT_DECAY_ON}")
    schedule = learning_rate_schedule(config, steps_per_epoch)
    clip = (
        optax.clip_by_global_norm(config.grad_clip_norm)
        if config.grad_clip_norm > 0
        else optax.identity()
    )
    mask = decay_mask(config)
    if config.optimizer == "sgd":
        return optax.chain(
            clip,
            optax.add_decayed_weights(config.weight_decay, mask=mask),
            optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
        )
    b1, b2 = config.adam_betas
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=config.adam_eps)
    decay = optax.add_decayed_weights(config.weight_decay, mask=mask)
    if config.optimizer == "adamw":
        return optax.chain(clip, adam, decay, optax.scale_by_learning_rate(schedule))
    trust = optax.scale_by_trust_ratio()
    if config.weight_decay == 0:
        trust = optax.identity()  # timm's Lamb adapts only parameters that are decayed
    elif mask is not None:
        trust = optax.masked(trust, mask)
    return optax.chain(clip, adam, decay, trust, optax.scale_by_learning_rate(schedule))
