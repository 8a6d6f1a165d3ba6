"""Learned variables V_L: the per-cell recurrent states (the emergent weights).

Layer l holds, for its A x B = n_l x n_{l+1} grid of cells,

    h [A, B, H]   hidden vector of every cell
    c [A, B, H]   LSTM context vector ([A, B, 0] for a vanilla cell)

plus what the online protocol carries from one example to the next:

    error [C]     e_{t-1}, the error of the previous prediction
    label [C]     y_{t-1}, the previous one-hot label (used if cfg.feed_label)
    step []       examples seen so far (int32; the clock if cfg.clock_slot >= 0)

A batch of episodes simply adds leading axes (use `jax.vmap`).
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from vsml_jax.config import VSMLConfig


@struct.dataclass
class LayerState:
    h: jax.Array
    c: jax.Array


@struct.dataclass
class VSMLState:
    """V_L of one episode: every layer's cell states, the last error and label
    fed back, and step, the number of examples seen (int32 []; the clock of
    `VSMLConfig.clock_slot`)."""
    layers: Tuple[LayerState, ...]
    error: jax.Array
    label: jax.Array
    step: jax.Array


def _init_layer_state(key: jax.Array, cfg: VSMLConfig, A: int, B: int) -> LayerState:
    H = cfg.hidden_size
    dtype = jnp.dtype(cfg.dtype)
    n_random = int(round(cfg.init_random_fraction * H))
    # The random part seeds the emergent weights (like a random weight init);
    # it lives in the slow variable: c for an LSTM, h for a vanilla cell.
    # Drawn flat then reshaped (same numbers; the 1-D draw compiles faster).
    noise = cfg.init_std * jax.random.normal(key, (A * B * n_random,), dtype)
    noise = noise.reshape(A, B, n_random)
    slow = jnp.concatenate([noise, jnp.zeros((A, B, H - n_random), dtype)], axis=-1)
    if cfg.cell == "lstm":
        return LayerState(h=jnp.zeros((A, B, H), dtype), c=slow)
    return LayerState(h=slow, c=jnp.zeros((A, B, 0), dtype))


def init_state(key: jax.Array, cfg: VSMLConfig) -> VSMLState:
    """A fresh V_L for one episode: random states, no error or label seen yet."""
    keys = jax.random.split(key, cfg.num_layers)
    sizes = cfg.layer_sizes
    layers = tuple(_init_layer_state(keys[l], cfg, sizes[l], sizes[l + 1])
                   for l in range(cfg.num_layers))
    zeros = jnp.zeros((cfg.num_classes,), jnp.dtype(cfg.dtype))
    return VSMLState(layers=layers, error=zeros, label=zeros,
                     step=jnp.zeros((), jnp.int32))


def init_states(key: jax.Array, cfg: VSMLConfig, batch_size: int) -> VSMLState:
    """`batch_size` independent episode states, stacked on a leading axis."""
    return jax.vmap(lambda k: init_state(k, cfg))(jax.random.split(key, batch_size))


def count_learned_variables(cfg: VSMLConfig) -> int:
    """|V_L|: the number of per-cell state variables (h and c of every cell)."""
    per_cell = cfg.hidden_size * (2 if cfg.cell == "lstm" else 1)
    sizes = cfg.layer_sizes
    return int(sum(sizes[l] * sizes[l + 1] for l in range(cfg.num_layers)) * per_cell)
