"""Pure train and eval steps, and the train state: what gets compiled, nothing else.

`train_step(state, batch) -> (state, metrics)` and `eval_step(params, batch) -> sums` are plain
functions of pytrees, jitted by the trainer with shardings, and by benchmarks as they are.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from bitnet_jax.model.transformer import Transformer


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


# ----------------------------------------------------------------------------------------------
# Pure steps.

def token_nll(model: Transformer, params, inputs_BxT, targets_BxT) -> jax.Array:
    """Negative log-likelihood of every target token, float32 (B, T)."""
    logits_BxTxV = model.apply({"params": params}, inputs_BxT)
    log_z = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    target_logit = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return log_z - target_logit


def make_train_step(model: Transformer, optimizer: optax.GradientTransformation,
                    grad_accum: int) -> Callable:
    """state, batch -> state, metrics. Micro-batches are scanned, gradients averaged in float32.

    A non-finite loss leaves the state unchanged (the loop then stops and says where).
    """

    def loss_fn(params, inputs, targets):
        return jnp.mean(token_nll(model, params, inputs, targets))

    def train_step(state: TrainState, batch: dict):
        def split(x):  # (B, T) -> (accum, B / accum, T)
            return x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])

        def micro_step(carry, micro):
            loss_sum, grad_sum = carry
            loss, grads = jax.value_and_grad(loss_fn)(state.params, micro["inputs"],
                                                      micro["targets"])
            grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
            return (loss_sum + loss, grad_sum), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        micro_batches = {k: split(batch[k]) for k in ("inputs", "targets")}
        (loss_sum, grad_sum), _ = jax.lax.scan(micro_step, (jnp.zeros((), jnp.float32), zeros),
                                               micro_batches)
        loss = loss_sum / grad_accum
        grads = jax.tree.map(lambda g: g / grad_accum, grad_sum)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                 TrainState(state.step + 1, params, opt_state), state)
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return train_step


def make_eval_step(model: Transformer) -> Callable:
    """params, batch -> summed NLL, token count and byte count (for exact bits per byte)."""

    def eval_step(params, batch: dict):
        nll = token_nll(model, params, batch["inputs"], batch["targets"])
        return {"nll": jnp.sum(nll), "tokens": jnp.asarray(nll.size, jnp.float32),
                "bytes": jnp.sum(batch["target_bytes"]).astype(jnp.float32)}

    return eval_step


def eval_metrics(sums: dict) -> dict:
    loss = sums["nll"] / sums["tokens"]
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)),
            "eval_bpb": sums["nll"] / math.log(2) / max(sums["bytes"], 1.0)}
