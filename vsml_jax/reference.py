"""A straightforward per-cell implementation of the VSML layer (the reference).

Each cell (a, b) runs the plain LSTM / RNN step on its own copy of the
incoming messages, and each cell projects its own outgoing message before the
reduction. It has the same interface as `vsml_jax.grid`, so
`unroll(..., impl="reference")` runs the whole episode on it. Tests check the
fast kernels against it; the benchmark measures the speed-up over it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vsml_jax.config import VSMLConfig
from vsml_jax.grid import coordinate_features
from vsml_jax.params import CellParams
from vsml_jax.state import LayerState


def cell_tick(p: CellParams, cfg: VSMLConfig, h, c, f_a, g_b, coord):
    """One tick of one cell. h, c [H]; f_a, g_b [m]; coord [3] -> (h, c)."""
    pre = h @ p.w_h + f_a @ p.w_f + g_b @ p.w_b + p.bias
    if p.w_coord is not None:
        pre = pre + coord @ p.w_coord
    clip = (lambda x: x) if cfg.state_clip is None else (
        lambda x: jnp.clip(x, -cfg.state_clip, cfg.state_clip))
    if cfg.cell == "lstm":
        i, f, g, o = jnp.split(pre, 4)
        c = clip(jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g))
        return jax.nn.sigmoid(o) * jnp.tanh(c), c
    return clip(jnp.tanh(pre)), c


def layer_ticks(p: CellParams, cfg: VSMLConfig, s: LayerState, fwd_in, bwd_in,
                layer_index: int) -> LayerState:
    A, B = fwd_in.shape[0], bwd_in.shape[0]
    pos_a, pos_b, pos_l = coordinate_features(A, B, layer_index, cfg.num_layers)
    coord = jnp.stack([jnp.broadcast_to(pos_a[:, None], (A, B)),
                       jnp.broadcast_to(pos_b[None, :], (A, B)),
                       jnp.full((A, B), pos_l)], axis=-1).astype(fwd_in.dtype)
    tick = lambda h, c, f, g, k: cell_tick(p, cfg, h, c, f, g, k)
    # vmap over b (inner) then a (outer): every cell gets its own messages.
    grid_tick = jax.vmap(jax.vmap(tick, in_axes=(0, 0, None, 0, 0)),
                         in_axes=(0, 0, 0, None, 0))
    h, c = s.h, s.c
    for _ in range(cfg.micro_ticks):
        h, c = grid_tick(h, c, fwd_in, bwd_in, coord)
    return LayerState(h=h, c=c)


def _reduce(x, axis, how):
    return jnp.mean(x, axis=axis) if how == "mean" else jnp.sum(x, axis=axis)


def forward_messages(p: CellParams, cfg: VSMLConfig, s: LayerState):
    per_cell = jax.vmap(jax.vmap(lambda h: h @ p.c_fwd))(s.h)  # [A, B, m]
    return _reduce(per_cell, 0, cfg.reduce)


def backward_messages(p: CellParams, cfg: VSMLConfig, s: LayerState):
    if p.u_bwd is None:
        return jnp.zeros((s.h.shape[0], cfg.msg_size), s.h.dtype)
    per_cell = jax.vmap(jax.vmap(lambda h: h @ p.u_bwd))(s.h)
    return _reduce(per_cell, 1, cfg.reduce)
