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

For BPTT the LSTM ticks have a hand-written backward pass (`_lstm_ticks`):
it saves only the ticks' inputs and recomputes the gates, so a step costs
~1 MB of residuals for the 784 x 10 grid instead of ~17 MB with autodiff.

On CPU the grid is processed in row tiles that fit in cache (`num_tiles`);
other backends run it as one wide op. The state layout stays [A, B, H]: with
H (or G = 4H) innermost, every elementwise pass runs over contiguous vectors
whose length is a multiple of the SIMD width, whereas a layout with B
innermost (B = 10 classes) vectorises badly (measured 2x slower on CPU).

Shapes: h, c [A, B, H]; messages [A, m] / [B, m]; pre-activations [.., G].
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import struct

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


Slots = Optional[Tuple[int, ...]]


def _project(msg: jax.Array, w: jax.Array, slots: Slots) -> jax.Array:
    """msg [N, m] @ w [m, G], given that only the columns `slots` of msg can be non-zero.

    With slots=None it is the plain matmul. With the slots known (the input
    message carries x on one slot, the error message e on one or two), it is
    a broadcast multiply-add per slot on GPU: elementwise, so the compiler
    fuses it into the gate computation that reads it instead of launching a
    matmul (and the pad that builds the message) on every time step. The TPU
    compiler instead fuses the matmul with its operands and gives the slot
    form separate kernels for the row slices and layout changes, and on CPU
    the slot form measured slower for batches of episodes, so both keep the
    matmul. The result is the same either way: the other columns only
    contribute exact zeros.
    """
    if slots is None:
        return msg @ w
    by_slots = functools.partial(_project_slots, slots=slots)
    return jax.lax.platform_dependent(msg, w, cuda=by_slots, rocm=by_slots,
                                      default=jnp.matmul)


def _project_slots(msg: jax.Array, w: jax.Array, slots: Tuple[int, ...]) -> jax.Array:
    """sum over k in slots of msg[:, k] (outer) w[k]: [N, G], the GPU form of `_project`."""
    out = jnp.zeros((msg.shape[0], w.shape[1]), jnp.result_type(msg, w))
    for k in slots:
        out = out + msg[:, k, None] * w[k]
    return out


def neuron_preactivations(p: CellParams, cfg: VSMLConfig, fwd_in: jax.Array,
                          bwd_in: jax.Array, layer_index: int,
                          fwd_slots: Slots = None, bwd_slots: Slots = None
                          ) -> Tuple[jax.Array, jax.Array]:
    """Message (and coordinate) part of the cells' pre-activations, per neuron.

    Args:
      fwd_in: [A, m] forward message of each input neuron.
      bwd_in: [B, m] backward message of each output neuron.
      fwd_slots, bwd_slots: the message columns that can be non-zero (None:
        any); see `_project`.
    Returns:
      (pre_a [A, G], pre_b [B, G]); cell (a, b) adds pre_a[a] + pre_b[b]. The
      bias is folded into pre_b.
    """
    pre_a = _project(fwd_in, p.w_f, fwd_slots)
    pre_b = _project(bwd_in, p.w_b, bwd_slots) + p.bias
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


@struct.dataclass
class GateScaledParams(CellParams):
    """CellParams of an LSTM whose gate columns are already scaled by
    `_lstm_gate_scale` (w_h, w_f, w_b, bias, w_coord; c_fwd and u_bwd as they
    are). `network.unroll` scales V_M once before its time loop, so the loop
    does not redo it (and launch it) on every step; the kernels skip their own
    scaling for these. The scale is 1/2 or 1, so the results are bit for bit
    the same.
    """


def gate_scaled(p: CellParams, cfg: VSMLConfig) -> CellParams:
    """p as GateScaledParams for an LSTM (any leading axes, e.g. stacked layers);
    p itself for a vanilla cell or if already scaled."""
    if cfg.cell != "lstm" or isinstance(p, GateScaledParams):
        return p
    scale = _lstm_gate_scale(cfg.hidden_size, p.w_h.dtype)
    return GateScaledParams(
        w_h=p.w_h * scale, w_f=p.w_f * scale, w_b=p.w_b * scale, bias=p.bias * scale,
        c_fwd=p.c_fwd, u_bwd=p.u_bwd,
        w_coord=None if p.w_coord is None else p.w_coord * scale)


def _clip(x: jax.Array, bound: Optional[float]) -> jax.Array:
    return x if bound is None else jnp.clip(x, -bound, bound)


# Cells per tile on CPU. A tile's pre-activations and gates ([cells, G] each,
# ~125 KB for 512 cells and G = 64) then stay in the per-core L2 cache through
# both micro ticks, instead of the whole grid streaming through memory once per
# elementwise pass. On a 2-core AVX-512 Xeon, 16 tiles of the 784 x 10 grid
# cut the CPU time of a whole step by ~25% (see experiments/BENCHMARK.md).
TILE_CELLS = 512


def num_tiles(A: int, B: int) -> int:
    """How many row tiles of the A x B grid the CPU path uses (1 = no tiling).

    The tile count divides A (tiles are reshapes, not copies) and gives tiles
    of about `TILE_CELLS` cells (closest on a log scale).
    """
    if A * B < 2 * TILE_CELLS:
        return 1
    best, best_err = 1, float("inf")
    for n in range(2, A + 1):
        if A % n == 0:
            err = abs(math.log((A // n) * B / TILE_CELLS))
            if err < best_err:
                best, best_err = n, err
    return best


def _ticks(cfg: VSMLConfig, w_h: jax.Array, pre_a: jax.Array, pre_b: jax.Array,
           h: jax.Array, c: jax.Array, act=jnp.tanh, matmul=jnp.matmul
           ) -> Tuple[jax.Array, jax.Array]:
    """`cfg.micro_ticks` ticks of a block of A' rows of cells.

    Args:
      w_h: [H, G] (LSTM: sigmoid-gate columns pre-scaled by 1/2).
      pre_a: [A', G]; pre_b: [B, G] (scaled like w_h).
      h, c: [A', B, H] (c is [A', B, 0] for a vanilla cell).
      act, matmul: the nonlinearity and the h @ w_h contraction; only the
        benchmark's ablations replace them.
    Returns:
      (h, c) after the ticks, same shapes.
    """
    pre_ab = pre_a[:, None, :] + pre_b[None, :, :]
    if cfg.cell == "lstm":
        for _ in range(cfg.micro_ticks):
            # One tanh over all G pre-activations, then slice: with a tanh per
            # gate slice XLA materialises each slice separately (measured slower).
            t = act(matmul(h, w_h) + pre_ab)
            i, f, g, o = jnp.split(t, 4, axis=-1)
            # i, f, o are sigmoids: (1 + tanh(x/2)) / 2.
            c = _clip(0.5 * (f + 1.0) * c + 0.5 * (i + 1.0) * g, cfg.state_clip)
            h = 0.5 * (o + 1.0) * act(c)
        return h, c
    for _ in range(cfg.micro_ticks):
        h = _clip(act(matmul(h, w_h) + pre_ab), cfg.state_clip)
    return h, c


def _clip_grad_mask(x: jax.Array, bound: Optional[float]) -> jax.Array:
    """d clip(x) / dx as jax.grad gives it: 1 inside, 0 outside, 1/2 on the bound."""
    if bound is None:
        return jnp.ones_like(x)
    return 0.25 * (1.0 + jnp.sign(bound - x)) * (1.0 + jnp.sign(x + bound))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lstm_ticks(cfg: VSMLConfig, w_h, pre_a, pre_b, h, c):
    """`_ticks` for an LSTM with a hand-written backward pass (same shapes).

    The forward pass saves only its inputs; the backward pass recomputes the
    gates of the `cfg.micro_ticks` ticks and runs them in reverse with one
    fused elementwise pass per tick (no transcendentals: it reuses the tanh
    values), dz @ w_h^T and h^T dz. Compared with autodiff it keeps neither
    the gates of every tick nor autodiff's many elementwise intermediates
    alive between the passes, so BPTT needs less memory and memory traffic.
    """
    return _ticks(cfg, w_h, pre_a, pre_b, h, c)


def _lstm_ticks_fwd(cfg, w_h, pre_a, pre_b, h, c):
    return _ticks(cfg, w_h, pre_a, pre_b, h, c), (w_h, pre_a, pre_b, h, c)


def _lstm_ticks_bwd(cfg, res, cts):
    w_h, pre_a, pre_b, h, c = res
    dh, dc = cts
    H = cfg.hidden_size
    pre_ab = pre_a[:, None, :] + pre_b[None, :, :]
    # Recompute the ticks, keeping what the reverse pass needs.
    tape = []
    for _ in range(cfg.micro_ticks):
        t = jnp.tanh(h @ w_h + pre_ab)
        i, f, g, o = jnp.split(t, 4, axis=-1)
        c_raw = 0.5 * (f + 1.0) * c + 0.5 * (i + 1.0) * g
        c_new = _clip(c_raw, cfg.state_clip)
        tc = jnp.tanh(c_new)
        tape.append((h, c, t, c_raw, tc))
        h, c = 0.5 * (o + 1.0) * tc, c_new
    dw = jnp.zeros_like(w_h)
    dpre = None
    for h_prev, c_prev, t, c_raw, tc in reversed(tape):
        i, f, g, o = jnp.split(t, 4, axis=-1)
        dc_raw = (dc + dh * 0.5 * (o + 1.0) * (1.0 - tc * tc)) * _clip_grad_mask(
            c_raw, cfg.state_clip)
        # d/dx of (1 + tanh x) / 2 through t is 0.5 * (1 - t^2): the 0.5 is here.
        dt = jnp.concatenate([0.5 * dc_raw * g, 0.5 * dc_raw * c_prev,
                              dc_raw * 0.5 * (i + 1.0), 0.5 * dh * tc], axis=-1)
        dz = dt * (1.0 - t * t)
        G = dz.shape[-1]
        dw = dw + h_prev.reshape(-1, H).T @ dz.reshape(-1, G)
        dpre = dz if dpre is None else dpre + dz
        dh = dz @ w_h.T
        dc = dc_raw * 0.5 * (f + 1.0)
    return dw, jnp.sum(dpre, axis=1), jnp.sum(dpre, axis=0), dh, dc


_lstm_ticks.defvjp(_lstm_ticks_fwd, _lstm_ticks_bwd)


def _block_ticks(cfg: VSMLConfig, w_h, pre_a, pre_b, h, c):
    """The ticks of a block of rows: the custom-VJP LSTM or the plain vanilla cell."""
    if cfg.cell == "lstm":
        return _lstm_ticks(cfg, w_h, pre_a, pre_b, h, c)
    return _ticks(cfg, w_h, pre_a, pre_b, h, c)


def _tiled_ticks(cfg: VSMLConfig, tiles: int, w_h, pre_a, pre_b, h, c, **kw):
    """`_ticks` on `tiles` row blocks of the grid, one after the other.

    Cells only interact through the messages, which are fixed during the micro
    ticks, so the blocks are independent; running them in sequence keeps each
    block's working set in cache. Same shapes as `_ticks`.
    """
    A = h.shape[0]
    split = lambda x: x.reshape((tiles, A // tiles) + x.shape[1:])
    ticks = functools.partial(_ticks, **kw) if kw else _block_ticks
    h, c = jax.lax.map(lambda args: ticks(cfg, w_h, args[0], pre_b, args[1], args[2]),
                       (split(pre_a), split(h), split(c)))
    merge = lambda x: x.reshape((A,) + x.shape[2:])
    return merge(h), merge(c)


def scaled_preactivations(p: CellParams, cfg: VSMLConfig, fwd_in: jax.Array,
                          bwd_in: jax.Array, layer_index: int,
                          fwd_slots: Slots = None, bwd_slots: Slots = None):
    """(w_h [H, G], pre_a [A, G], pre_b [B, G]) as `_ticks` takes them.

    For an LSTM the sigmoid-gate columns are halved, so that one tanh gives
    every gate (sigmoid(x) = (1 + tanh(x / 2)) / 2), unless p is
    GateScaledParams (then they already are).
    """
    pre_a, pre_b = neuron_preactivations(p, cfg, fwd_in, bwd_in, layer_index,
                                         fwd_slots, bwd_slots)
    w_h = p.w_h
    if cfg.cell == "lstm" and not isinstance(p, GateScaledParams):
        scale = _lstm_gate_scale(cfg.hidden_size, pre_a.dtype)
        w_h, pre_a, pre_b = w_h * scale, pre_a * scale, pre_b * scale
    return w_h, pre_a, pre_b


def layer_ticks(p: CellParams, cfg: VSMLConfig, s: LayerState, fwd_in: jax.Array,
                bwd_in: jax.Array, layer_index: int, tiles: Optional[int] = None,
                fwd_slots: Slots = None, bwd_slots: Slots = None) -> LayerState:
    """Runs every cell of one layer for `cfg.micro_ticks` ticks on fixed messages.

    Args:
      s: LayerState with h, c [A, B, H].
      fwd_in: [A, m]; bwd_in: [B, m].
      tiles: row tiles of the grid on CPU (default `num_tiles(A, B)`; it must
        divide A). Other backends always run the whole grid in one go: they
        want wide ops, and the choice is made at lowering time
        (`jax.lax.platform_dependent`), so one jitted function serves all.
      fwd_slots, bwd_slots: the columns of fwd_in / bwd_in that can be
        non-zero (None: any), e.g. (cfg.input_slot,) for layer 0's input
        message; the others must be zero (see `_project`).
    Returns:
      the new LayerState, same shapes.
    """
    w_h, pre_a, pre_b = scaled_preactivations(p, cfg, fwd_in, bwd_in, layer_index,
                                              fwd_slots, bwd_slots)
    A, B = s.h.shape[0], s.h.shape[1]
    tiles = num_tiles(A, B) if tiles is None else tiles
    if tiles < 1 or A % tiles:
        raise ValueError(f"layer_ticks: tiles={tiles} must be a positive divisor of "
                         f"the grid's A={A} rows.")
    whole = functools.partial(_block_ticks, cfg)
    if tiles == 1:
        h, c = whole(w_h, pre_a, pre_b, s.h, s.c)
    else:
        h, c = jax.lax.platform_dependent(
            w_h, pre_a, pre_b, s.h, s.c,
            cpu=functools.partial(_tiled_ticks, cfg, tiles), default=whole)
    return LayerState(h=h, c=c)


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
