r"""Maximal update parametrization (muP, Tensor Programs V, Yang et al. 2022), Adam version.

`ModelConfig.parametrization = "mup"` makes the best hyperparameters (above all the learning
rate) of a model of width `mup_base_d_model` carry over to wider ones. The rules are relative to
that base: with the width multiplier m = d_model / mup_base_d_model, every role below is
exactly `standard` at m = 1, so muP changes nothing at the base width (tested bit for bit).

The table implemented (TP-V Table 8, the formulation with an output multiplier, as
microsoft/mup's MuReadout + MuAdamW; "hidden" = matrices with both dimensions growing with
width, here every BitLinear kernel of the blocks: q, k, v, o, gate, up, down):

    role        params                          init std          Adam LR    weight decay
    embedding   embed_tokens (vocab -> d)       init_std          lr         wd
    hidden      q/k/v/o, gate/up/down kernels   init_std/sqrt(m)  lr / m     wd (lr * wd held)
    output      lm_head (d -> vocab)            init_std          lr         wd
    vector      RMSNorm scales                  1                 lr         none (as standard)
    forward     logits * (1/m); attention logits q.k * sqrt(base_head_dim) / head_dim

- The output multiplier 1/m replaces Table 3's output init variance 1/fan_in^2 and LR lr/fan_in
  (the two formulations give the same training dynamics for Adam; this one keeps the readout's
  init and LR equal to the base model's). No zero-init of the readout: it would break
  "identical at the base width", and TP-V finds it optional.
- Attention scales logits by 1/d instead of 1/sqrt(d): sqrt(b)/d with b = `mup_base_head_dim`,
  which is 1/sqrt(d) at d = b. When widening adds heads and keeps head_dim (the ladder presets),
  this is the standard scale; it only matters where head_dim grows.
- Weight decay: decoupled and multiplied by the (scaled) LR, as PyTorch's AdamW. The LR scale
  multiplies Adam's direction only, so lr * wd stays as in the base model (what MuAdamW gets by
  multiplying each hidden group's weight_decay by m).
- One width multiplier for every hidden dimension: d_ff and n_heads * head_dim are assumed to
  grow with d_model by the same factor (as in microsoft/mup's single base model). Set
  `mup_base_d_model` to the width the LR was tuned at; by default it is the preset's own.

BitLinear under width changes. The latent (float) weights follow the table; what the forward
pass sees is the quantized weight, so it must inherit the latent weight's scaling:
- Ternary absmean weights are scale-equivariant: gamma(cW) = c gamma(W), codes unchanged, so
  Q(cW) = c Q(W). An init std of init_std/sqrt(m) gives gamma proportional to 1/sqrt(fan_in) and
  Q(W) x the same Theta(1) size as W x (the codes are a fixed-density +-1 pattern, ~2/3 non-zero
  for a Gaussian latent). Per-channel and per-group scales are equivariant in the same way.
- Per-token absmax activation quantization is equivariant too (Q(cx) = c Q(x)); its step is
  absmax / 127, and absmax over n coordinates grows like sqrt(2 log n) rms, from ~3.0 rms at
  n = 64 to ~3.5 rms at n = 512: a relative resolution change of a few per cent at 8 bits,
  negligible. (4-bit activations lose more, but the loss grows only like sqrt(log n) too.)
- Updates. Under Adam with lr / m the latent entries move by ~lr/m per step, while the ternary
  threshold gamma / 2 is ~ 1/sqrt(fan_in); the fraction of codes that flip per step is thus
  ~ (lr / m) / gamma ~ 1/sqrt(fan_in), and each flip moves a weight by gamma ~ 1/sqrt(fan_in).
  The flips follow the sign of Adam's update, which is correlated with the inputs x, so
  Delta(Q(W)) x sums fan_in * (1/sqrt(fan_in)) * (1/sqrt(fan_in)) = Theta(1) correlated terms,
  as muP's Delta(W) x does: in expectation (straight-through / dithering argument: rounding of a
  slowly moving latent with a fixed-density threshold is unbiased on average) the quantized
  forward gets muP's Theta(1) update. tests/test_mup.py checks it empirically with a coordinate
  check for bf16, b1.58 and a4.8 rather than trusting the argument.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Optional

import flax.linen as nn
import jax

if TYPE_CHECKING:  # the config lives with the model; only its fields are read here
    from bitnet_jax.model.transformer import ModelConfig

PARAMETRIZATIONS = ("standard", "mup")
ROLES = ("embedding", "hidden", "output", "vector")


@dataclasses.dataclass(frozen=True)
class MupScale:
    """Multipliers of one parameter: of its init std and of its Adam learning rate.

    A plain dataclass (not a pytree), so a tree of these has one per parameter leaf.
    """

    init: float = 1.0
    lr: float = 1.0


def width_multiplier(config: "ModelConfig") -> float:
    """m = d_model / mup_base_d_model under muP; 1 under the standard parametrization."""
    if config.parametrization != "mup":
        return 1.0
    return config.d_model / config.mup_base_d_model


def role_scale(config: "ModelConfig", role: str) -> MupScale:
    """The init and LR multipliers of a parameter role (the table in the module docstring)."""
    if role not in ROLES:
        raise ValueError(f"unknown parameter role {role!r}; roles are {ROLES}")
    m = width_multiplier(config)
    if role == "hidden" and m != 1.0:
        return MupScale(init=1.0 / math.sqrt(m), lr=1.0 / m)
    return MupScale()


def output_multiplier(config: "ModelConfig") -> float:
    """What the logits are multiplied by: 1/m under muP (TP-V Table 8), else 1."""
    return 1.0 / width_multiplier(config)


def attention_scale(config: "ModelConfig") -> Optional[float]:
    """The softmax scale of attention logits; None means the default 1/sqrt(head_dim).

    muP's 1/d rule, normalised to agree with 1/sqrt(d) at the base head size. None wherever the
    two agree, so the attention kernels run exactly as under `standard` there.
    """
    if config.parametrization != "mup" or config.head_dim == config.mup_base_head_dim:
        return None
    return math.sqrt(config.mup_base_head_dim) / config.head_dim


def _key_name(entry: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def param_role(path: tuple) -> str:
    """The muP role of a parameter from its path in the Transformer's parameter tree."""
    names = [_key_name(entry) for entry in path]
    if "embed_tokens" in names:
        return "embedding"
    if "lm_head" in names:
        return "output"
    if names and names[-1] == "kernel":
        return "hidden"
    return "vector"  # RMSNorm scales (and anything else that is not a matrix of the blocks)


def mup_multipliers(config: "ModelConfig", params: Any) -> Any:
    """A tree like `params` (plain or boxed, arrays or shapes) with a MupScale per leaf
    (in place of the box for boxed parameters)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: role_scale(config, param_role(path)), params,
        is_leaf=lambda leaf: isinstance(leaf, nn.Partitioned))
