"""The two layouts of the decoder blocks' parameters, and the one pair of functions between them.

Unrolled (`model.scan_layers: false`): one subtree per block, `layers_0`, `layers_1`, ... --
the layout of Hugging Face checkpoints, packed files and the KV-cache decoder. Scanned (`true`):
one subtree `layers` whose leaves carry a leading axis of length n_layers (logical axis `layers`),
what `nn.scan` over the blocks wants. Every consumer that needs one layout converts with
`stack_layers` / `unstack_layers` (or `to_layout`); nothing else knows both.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

SCANNED = "layers"  # the scanned blocks' subtree (also the logical axis of the leading dim)
_UNROLLED = re.compile(r"layers_(\d+)$")


def unrolled_indices(params: dict) -> list[int]:
    return sorted(int(m.group(1)) for key in params if (m := _UNROLLED.match(str(key))))


def is_scanned(params: dict) -> bool:
    """Whether a parameter tree (or any tree keyed like one) holds the blocks stacked."""
    return SCANNED in params and not unrolled_indices(params)


def stack_layers(params: dict) -> dict:
    """`layers_0 .. layers_{L-1}` -> `layers` with every leaf stacked on a new leading axis."""
    indices = unrolled_indices(params)
    if not indices:
        return dict(params)
    assert indices == list(range(len(indices))), f"blocks are not 0..L-1: {indices}"
    blocks = [params[f"layers_{i}"] for i in indices]
    rest = {k: v for k, v in params.items() if not _UNROLLED.match(str(k))}
    return {**rest, SCANNED: jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)}


def unstack_layers(params: dict) -> dict:
    """`layers` (leaves with a leading n_layers axis) -> `layers_0 .. layers_{L-1}`."""
    if not is_scanned(params):
        return dict(params)
    stacked = params[SCANNED]
    n_layers = jax.tree.leaves(stacked)[0].shape[0]
    rest = {k: v for k, v in params.items() if k != SCANNED}
    return {**rest, **{f"layers_{i}": jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
                       for i in range(n_layers)}}


def to_layout(params: dict, scanned: bool) -> dict:
    """The tree in the scanned or unrolled layout, whichever it is in now."""
    return stack_layers(params) if scanned else unstack_layers(params)


def layout_name(scanned: bool) -> str:
    return "scanned (model.scan_layers=true)" if scanned else "unrolled (model.scan_layers=false)"


def layer_count(params: Any) -> int:
    """Number of blocks in either layout."""
    if is_scanned(params):
        return jax.tree.leaves(params[SCANNED])[0].shape[0]
    return len(unrolled_indices(params))
