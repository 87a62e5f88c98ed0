"""The optimizer and learning-rate schedule, built from a training config."""

import flax
import optax

SCHEDULES = ("step", "cosine")
WEIGHT_DECAY_ON = ("all", "kernels")


def scaled_learning_rate(config) -> float:
    """The linear scaling rule: `learning_rate` per `lr_batch_size` images."""
    return config.learning_rate * config.batch_size / config.lr_batch_size


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """Linear warmup from 0, then step decay (divide at `lr_drop_epochs`) or cosine to 0."""
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
        main = optax.cosine_decay_schedule(peak, max(total - warmup, 1))
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def kernel_mask(params):
    """True for conv and linear kernels: BN scales and biases get no weight decay."""
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


def create_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay, as in the paper's Torch code."""
    if config.optimizer != "sgd":
        raise ValueError(f"optimizer={config.optimizer!r}; only 'sgd' (the paper's) is built in")
    if config.weight_decay_on not in WEIGHT_DECAY_ON:
        raise ValueError(f"weight_decay_on={config.weight_decay_on!r}; choose {WEIGHT_DECAY_ON}")
    schedule = learning_rate_schedule(config, steps_per_epoch)
    return optax.chain(
        # Clip the loss gradient alone, before weight decay joins it.
        optax.clip_by_global_norm(config.grad_clip_norm)
        if config.grad_clip_norm > 0
        else optax.identity(),
        # Torch's SGD adds wd * param to the gradient before momentum (L2, not AdamW-style).
        optax.add_decayed_weights(
            config.weight_decay, mask=kernel_mask if config.weight_decay_on == "kernels" else None
        ),
        optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
    )
