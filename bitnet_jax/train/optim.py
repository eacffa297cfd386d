r"""Optimizer and schedules: AdamW with BitNet's two-stage learning rate and weight decay.

Everything here is built from optax's own schedules and transforms; the functions only choose
and join them from an `OptimizerConfig`.

Step convention: a schedule is evaluated at the optimizer step count, the number of updates
applied so far. The first update uses `schedule(0)`, the last of `total_steps` updates uses
`schedule(total_steps - 1)`, and every decay reaches its end value at `total_steps` (optax's
convention, as in `optax.warmup_cosine_decay_schedule(decay_steps=total_steps)`). Warm-ups are
linear from 0, so `schedule(0) == 0` whenever `warmup_steps > 0`.

The BitNet b1.58 two-stage schedule (`schedule="bitnet"`). W = warmup_steps, S = stage-2 switch
step, T = total_steps, P1 = lr, P2 = stage2_lr (default 2/3 of lr), m = min_lr_ratio:

    LR  P1 |   /`-.__                    stage 1: from P1 towards P2 (reached at T), cut at S
           |  /      `-.__
        P2 | /            |`-.__         stage 2: from P2 down to m * P2 at T
           |/             |     `-.__
           +--------------+----------- step
           0 W            S          T
    wd       0.1 ........ | 0 ........     (weight_decay, then stage2_weight_decay)

Stage 1's end point is a choice the papers leave open: it aims at P2 *at the end of the run*.
So stage 1 stays a slow decay from the high peak, and the switch is always an abrupt drop (of
(P1 - P2) (T - S) / (T - W) for the linear shape) to the stage-2 peak, as the b1.58 FAQ and
2B4T describe. Decaying stage 1 towards m * P1 over the run instead would put it at 0.9e-3 at
the midpoint of the 700M recipe (1.5e-3 -> 1e-3, m = 0.1, W = 10%), below the stage-2 peak: the
"drop" would be a jump up. Ending stage 1 at P2 at S would make the switch a kink, not a drop.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
import optax

from bitnet_jax.config import OptimizerConfig
from bitnet_jax.errors import require
from bitnet_jax.model import mup
from bitnet_jax.model.transformer import ModelConfig

STAGE2_LR_RATIO = 2.0 / 3.0  # b1.58 FAQ Table 2: 1.5e-3 -> 1e-3 and 1.2e-3 -> 8e-4


# ----------------------------------------------------------------------------------------------
# Step arithmetic.

def fraction_step(fraction: float, total_steps: int) -> int:
    """The step where a stage starting at `fraction` of `total_steps` begins.

    Rounded to the nearest step (so 0.29 * 100 is 29, not 28), and kept in [1, total_steps - 1]
    so that both stages get at least one step.
    """
    require(total_steps >= 2, f"a two-stage schedule needs at least 2 steps, got {total_steps}")
    return min(max(int(round(fraction * total_steps)), 1), total_steps - 1)


def stage2_peak_lr(cfg: OptimizerConfig) -> float:
    """The stage-2 peak LR of the `bitnet` schedule: `cfg.stage2_lr`, by default 2/3 of `cfg.lr`."""
    return cfg.stage2_lr if cfg.stage2_lr is not None else STAGE2_LR_RATIO * cfg.lr


def stage2_switch_step(cfg: OptimizerConfig, total_steps: int) -> Optional[int]:
    """First step of stage 2 (lower LR peak, stage-2 weight decay); None unless `bitnet`."""
    if cfg.schedule != "bitnet":
        return None
    return fraction_step(cfg.stage2_fraction, total_steps)


def _check(cfg: OptimizerConfig, total_steps: int) -> None:
    """Fail with a readable message on configs the schedules cannot honour."""
    require(total_steps > 0, f"train.steps must be positive, got {total_steps}")
    require(cfg.lr > 0, f"optimizer.lr must be positive, got {cfg.lr}")
    require(0 <= cfg.warmup_steps < total_steps,
            f"optimizer.warmup_steps={cfg.warmup_steps} must be in [0, train.steps={total_steps})")
    require(0.0 <= cfg.min_lr_ratio <= 1.0,
            f"optimizer.min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    require(cfg.clip_norm is None or cfg.clip_norm > 0,
            f"optimizer.clip_norm must be positive or null (no clipping), got {cfg.clip_norm}")
    if cfg.schedule == "bitnet":
        peak2 = stage2_peak_lr(cfg)
        require(0 < peak2 <= cfg.lr,
                f"optimizer.stage2_lr={cfg.stage2_lr} must be in (0, optimizer.lr={cfg.lr}]: "
                f"stage 2 restarts from a lower peak")
        switch = fraction_step(cfg.stage2_fraction, total_steps)
        require(cfg.warmup_steps <= switch,
                f"optimizer.warmup_steps={cfg.warmup_steps} runs past the stage-2 switch at step "
                f"{switch} (optimizer.stage2_fraction={cfg.stage2_fraction} of train.steps="
                f"{total_steps}); lower warmup_steps or raise stage2_fraction")
    if cfg.schedule == "wsd":
        require(0.0 <= cfg.wsd_decay_fraction <= 1.0,
                f"optimizer.wsd_decay_fraction must be in [0, 1], got {cfg.wsd_decay_fraction}")
        decay_start = total_steps - int(round(cfg.wsd_decay_fraction * total_steps))
        require(cfg.warmup_steps <= decay_start,
                f"optimizer.warmup_steps={cfg.warmup_steps} overlaps the wsd decay, which starts "
                f"at step {decay_start}; lower warmup_steps or optimizer.wsd_decay_fraction")


# ----------------------------------------------------------------------------------------------
# Schedules.

def _decay(shape: str, init_value: float, end_value: float, steps: int) -> optax.Schedule:
    """`init_value` -> `end_value` over `steps` steps, linear or cosine, then held at the end."""
    if shape == "cosine":
        return optax.cosine_decay_schedule(init_value, steps, alpha=end_value / init_value)
    return optax.linear_schedule(init_value, end_value, steps)


def _warmup(cfg: OptimizerConfig) -> optax.Schedule:
    # Only consulted below `warmup_steps` by join_schedules; with 0 steps it is never used.
    return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)


def bitnet_lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """BitNet b1.58 two-stage LR: warm-up, slow decay from `lr`, drop to the stage-2 peak, decay.

    Stage 1 decays (shape `cfg.decay`) from `lr` towards the stage-2 peak at `total_steps` and is
    cut off at the switch; stage 2 decays from the stage-2 peak to `min_lr_ratio` of it at
    `total_steps`. See the module docstring for why stage 1 aims where it does.
    """
    peak2 = stage2_peak_lr(cfg)
    switch = fraction_step(cfg.stage2_fraction, total_steps)
    stage1 = _decay(cfg.decay, cfg.lr, peak2, total_steps - cfg.warmup_steps)
    stage2 = _decay(cfg.decay, peak2, peak2 * cfg.min_lr_ratio, total_steps - switch)
    return optax.join_schedules([_warmup(cfg), stage1, stage2], [cfg.warmup_steps, switch])


def wsd_lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Warmup-stable-decay: warm-up, constant `lr`, linear decay over the last fraction of steps.

    optax has no WSD schedule, hence the join of its linear and constant schedules.
    """
    decay_steps = int(round(cfg.wsd_decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    decay = optax.linear_schedule(cfg.lr, cfg.lr * cfg.min_lr_ratio, decay_steps)
    return optax.join_schedules(
        [_warmup(cfg), optax.constant_schedule(cfg.lr), decay], [cfg.warmup_steps, decay_start])


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """The LR schedule named by `cfg.schedule` (bitnet | cosine | wsd | constant)."""
    _check(cfg, total_steps)
    if cfg.schedule == "bitnet":
        return bitnet_lr_schedule(cfg, total_steps)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, cfg.warmup_steps, total_steps, end_value=cfg.lr * cfg.min_lr_ratio)
    if cfg.schedule == "wsd":
        return wsd_lr_schedule(cfg, total_steps)
    require(cfg.schedule == "constant",
            f"optimizer.schedule={cfg.schedule!r}; choose one of bitnet, cosine, wsd, constant")
    # Not optax.warmup_constant_schedule: with warmup_steps=0 it is a constant 0 (a linear
    # schedule over 0 steps holds its init value).
    return optax.join_schedules([_warmup(cfg), optax.constant_schedule(cfg.lr)],
                                [cfg.warmup_steps])


def weight_decay_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """`weight_decay`, switching to `stage2_weight_decay` at the stage-2 step for `bitnet`.

    Other schedules keep `weight_decay` throughout. A join of constants rather than
    `optax.piecewise_constant_schedule`, whose multiplicative scales cannot leave a 0.
    """
    _check(cfg, total_steps)
    switch = stage2_switch_step(cfg, total_steps)
    if switch is None:
        return optax.constant_schedule(cfg.weight_decay)
    return optax.join_schedules(
        [optax.constant_schedule(cfg.weight_decay),
         optax.constant_schedule(cfg.stage2_weight_decay)], [switch])


def current_hyperparams(cfg: OptimizerConfig, total_steps: int, step: int) -> dict[str, float]:
    """`{"lr", "weight_decay"}` used by the update at optimizer step `step` (for logging)."""
    return {"lr": float(learning_rate_schedule(cfg, total_steps)(step)),
            "weight_decay": float(weight_decay_schedule(cfg, total_steps)(step))}


# ----------------------------------------------------------------------------------------------
# Optimizer.

def _ndim(leaf: Any) -> int:
    # Arrays and jax.ShapeDtypeStruct (optimizer init under eval_shape) have .ndim; floats don't.
    return leaf.ndim if hasattr(leaf, "ndim") else np.ndim(leaf)


def weight_decay_mask(params: Any) -> Any:
    """True for the leaves that get weight decay: matrices (ndim >= 2), i.e. linear kernels and
    embeddings; False for RMSNorm scales and any other vector or scalar.

    The trainer passes unboxed params (`flax.linen.unbox`). Given a tree of `nn.Partitioned`
    boxes, the result keeps the boxes, each around a bool, matching the params' structure.
    """
    return jax.tree.map(lambda leaf: _ndim(leaf) >= 2, params)


def scale_by_mup_lr(model_config: ModelConfig) -> optax.GradientTransformation:
    """Multiply each leaf's update by its muP learning-rate multiplier (`mup.mup_multipliers`).

    The multipliers are Python floats fixed by the config and the tree's paths, so they are
    constants under jit and the state is empty. (optax.multi_transform with one label per role
    would do the same with a masked inner state per label; this keeps the state as adamw's.)
    """

    def update(updates, state, params=None):
        del params
        scales = mup.mup_multipliers(model_config, updates)
        return jax.tree.map(lambda u, s: u if s.lr == 1.0 else u * s.lr, updates, scales), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(cfg: OptimizerConfig, total_steps: int,
                   model_config: Optional[ModelConfig] = None) -> optax.GradientTransformation:
    """Global-norm clipping (if `cfg.clip_norm`), then AdamW with scheduled LR and weight decay.

    Update convention (decoupled weight decay scaled by the LR, as PyTorch's AdamW):
        g  <- g * min(1, clip_norm / ||g||)                  (global norm over all leaves)
        p  <- p - lr_t * (r * m_hat / (sqrt(v_hat) + eps) + wd_t * mask * p)
    with bias-corrected Adam moments m_hat, v_hat and r = 1, or under a muP `model_config` the
    per-parameter LR multiplier of `bitnet_jax.model.mup` (1/width multiplier for hidden
    matrices). r scales Adam's direction only, so lr * wd stays the base model's, as MuAdamW.
    `optax.adamw` (0.2.8) takes schedules for both the LR and the weight decay, so no
    `inject_hyperparams` is needed; each keeps its step count in the optimizer state, one per
    update, so the schedules see the optimizer step count. Gradient accumulation is the
    trainer's (a scan over micro-batches inside one step), so one update is one optimizer step.
    """
    learning_rate = learning_rate_schedule(cfg, total_steps)
    weight_decay = weight_decay_schedule(cfg, total_steps)
    if model_config is None or model_config.parametrization == "standard":
        adamw = optax.adamw(learning_rate=learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                            weight_decay=weight_decay, mask=weight_decay_mask)
    else:  # optax.adamw's own chain with the muP multipliers between Adam and the decay
        adamw = optax.chain(
            optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
            scale_by_mup_lr(model_config),
            optax.add_decayed_weights(weight_decay, weight_decay_mask),
            optax.scale_by_learning_rate(learning_rate))
    if cfg.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)


# ----------------------------------------------------------------------------------------------
# Two-stage precision (BitNet a4.8): 8-bit activations first, then the hybrid scheme.

def precision_switch_step(precision: str, stage1_precision: Optional[str],
                          stage1_fraction: float, total_steps: int) -> Optional[int]:
    """First step trained with `precision`; None when there is no stage-1 precision to leave."""
    if stage1_precision is None or stage1_precision == precision:
        return None
    return fraction_step(stage1_fraction, total_steps)


def precision_for_step(precision: str, stage1_precision: Optional[str], stage1_fraction: float,
                       step: int, total_steps: int) -> str:
    """The precision recipe for optimizer step `step`.

    BitNet a4.8 trains with `stage1_precision` (e.g. b1.58, 8-bit activations) for the first
    `stage1_fraction` of the steps, then continues with `precision` (e.g. a4.8) reusing the
    optimizer state; the trainer does the switch, this is only the rule.
    """
    switch = precision_switch_step(precision, stage1_precision, stage1_fraction, total_steps)
    if switch is not None and step < switch:
        return stage1_precision
    return precision
