"""Fast step kernels of one VSML layer: a grid of A x B weight-shared cells.

Every cell (a, b) of a layer runs the same small RNN (V_M), reading the
forward message f_a [m] of its input neuron a and the backward message g_b [m]
of its output neuron b (eq. 3 and 14). Written per cell, one LSTM tick costs
(2m + H) x 4H multiply-adds; two identities make it cheaper without changing
the result (the per-cell form lives in `vsml_jax.reference` and the tests
check the two agree):

1. The message part of the pre-activation splits per neuron:
   f_a @ w_f + g_b @ w_b = P_a + Q_b, so it is computed once per neuron
   ([A, G] and [B, G]) and broadcast-added. Messages are constant during the
   micro ticks of one data point, so it is also computed once per data point.
2. A linear messenger commutes with the reduction over cells:
   mean_a (h_ab @ C) = (mean_a h_ab) @ C, so reduce first, project once.

What is left per cell and tick is h_ab @ w_h ([H] x [H, G]) plus elementwise
gates. The three LSTM sigmoids are evaluated through one tanh over all G
pre-activations (sigmoid(x) = (1 + tanh(x / 2)) / 2, the halving folded into
the weights), which is one transcendental per gate on every backend.

Shapes: h, c [A, B, H]; messages [A, m] / [B, m]; pre-activations [.., G].
"""
from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from vsml_jax.config import VSMLConfig
from vsml_jax.params import CellParams
from vsml_jax.state import LayerState


def _reduce(x: jax.Array, axis: int, how: str) -> jax.Array:
    return jnp.mean(x, axis=axis) if how == "mean" else jnp.sum(x, axis=axis)


def coordinate_features(A: int, B: int, layer_index: int, num_layers: int):
    """Normalised coordinates: a/(A-1) [A], b/(B-1) [B] and the layer position."""
    pos_a = jnp.arange(A) / max(A - 1, 1)
    pos_b = jnp.arange(B) / max(B - 1, 1)
    pos_l = layer_index / max(num_layers - 1, 1)
    return pos_a, pos_b, pos_l


def neuron_preactivations(p: CellParams, cfg: VSMLConfig, fwd_in: jax.Array,
                          bwd_in: jax.Array, layer_index: int
                          ) -> Tuple[jax.Array, jax.Array]:
    """Message (and coordinate) part of the cells' pre-activations, per neuron.

    Args:
      fwd_in: [A, m] forward message of each input neuron.
      bwd_in: [B, m] backward message of each output neuron.
    Returns:
      (pre_a [A, G], pre_b [B, G]); cell (a, b) adds pre_a[a] + pre_b[b]. The
      bias is folded into pre_b.
    """
    pre_a = fwd_in @ p.w_f
    pre_b = bwd_in @ p.w_b + p.bias
    if p.w_coord is not None:
        pos_a, pos_b, pos_l = coordinate_features(
            fwd_in.shape[0], bwd_in.shape[0], layer_index, cfg.num_layers)
        pre_a = pre_a + pos_a[:, None] * p.w_coord[0] + pos_l * p.w_coord[2]
        pre_b = pre_b + pos_b[:, None] * p.w_coord[1]
    return pre_a, pre_b


def _lstm_gate_scale(H: int, dtype) -> jax.Array:
    """[G] factors: 1/2 for the sigmoid gates (i, f, o), 1 for g (tanh)."""
    half = jnp.full((H,), 0.5, dtype)
    return jnp.concatenate([half, half, jnp.ones((H,), dtype), half])


def _clip(x: jax.Array, bound: Optional[float]) -> jax.Array:
    return x if bound is None else jnp.clip(x, -bound, bound)


def layer_ticks(p: CellParams, cfg: VSMLConfig, s: LayerState, fwd_in: jax.Array,
                bwd_in: jax.Array, layer_index: int) -> LayerState:
    """Runs every cell of one layer for `cfg.micro_ticks` ticks on fixed messages.

    Args:
      s: LayerState with h, c [A, B, H].
      fwd_in: [A, m]; bwd_in: [B, m].
    Returns:
      the new LayerState, same shapes.
    """
    pre_a, pre_b = neuron_preactivations(p, cfg, fwd_in, bwd_in, layer_index)
    H = cfg.hidden_size
    if cfg.cell == "lstm":
        scale = _lstm_gate_scale(H, pre_a.dtype)
        w_h = p.w_h * scale
        pre_ab = (pre_a * scale)[:, None, :] + (pre_b * scale)[None, :, :]
        h, c = s.h, s.c
        for _ in range(cfg.micro_ticks):
            t = jnp.tanh(h @ w_h + pre_ab)
            i, f, g, o = jnp.split(t, 4, axis=-1)
            # i, f, o are sigmoids: (1 + tanh(x/2)) / 2.
            c = _clip(0.5 * (f + 1.0) * c + 0.5 * (i + 1.0) * g, cfg.state_clip)
            h = 0.5 * (o + 1.0) * jnp.tanh(c)
        return LayerState(h=h, c=c)
    pre_ab = pre_a[:, None, :] + pre_b[None, :, :]
    h = s.h
    for _ in range(cfg.micro_ticks):
        h = _clip(jnp.tanh(h @ p.w_h + pre_ab), cfg.state_clip)
    return LayerState(h=h, c=s.c)


def forward_messages(p: CellParams, cfg: VSMLConfig, s: LayerState) -> jax.Array:
    """[B, m]: the forward message of each output neuron, reduce_a(h_ab) @ C."""
    return _reduce(s.h, 0, cfg.reduce) @ p.c_fwd


def backward_messages(p: CellParams, cfg: VSMLConfig, s: LayerState) -> jax.Array:
    """[A, m]: the backward message of each input neuron, reduce_b(h_ab) @ U.

    Zeros when the backward interaction (eq. 14) is disabled.
    """
    if p.u_bwd is None:
        A = s.h.shape[0]
        return jnp.zeros((A, cfg.msg_size), s.h.dtype)
    return _reduce(s.h, 1, cfg.reduce) @ p.u_bwd
