"""Pallas step kernels of one VSML layer: the micro ticks of the whole grid fused.

Same public functions and results as `vsml_jax.grid` (`layer_ticks`,
`forward_messages`, `backward_messages`) plus `layer_step`, selected with
impl="pallas" (`vsml_jax.unroll`, `vsml_learner(cfg, impl="pallas")`, the
`--kernel=pallas` flag of experiments.meta_train and experiments.plan). On TPU
and GPU a time step is bound by kernel launches and passes over the [A, B, H]
state, which XLA splits over many kernels; here, for an LSTM cell:

- `layer_ticks` (`lstm_ticks`): the `cfg.micro_ticks` ticks of all A x B cells
  (pre_a[a] + pre_b[b] broadcast-add, h @ w_h, gates, clip) are ONE
  `pl.pallas_call`, and their reverse (recomputing the gates from the saved
  inputs, as `grid._lstm_ticks` does, then dh, dc, d pre_a = sum over b,
  d pre_b = sum over a, d w_h = sum over cells of h^T dz) is ONE more.
- `layer_step` (`fused_step`, what `unroll` uses): the same kernels also
  compute the message projections pre_a = fwd_in @ w_f, pre_b = bwd_in @ w_b +
  bias and the forward message reduce_a(h) @ c_fwd, and the reverse all of
  their gradients, so a layer's time step has (almost) no XLA kernels of its own.

A vanilla cell (and an LSTM with coordinate features, in `layer_step`) falls
back to `vsml_jax.grid`.

The kernel bodies share the per-cell gate math (`_cell_tick`, `_cell_tick_bwd`):

- The wide body (TPU, Mosaic): the state as its transpose [B*H, A] (a bitcast
  of XLA's TPU layout of [A, B, H]); the programs take blocks of `TPU_LANES`
  input neurons (lanes) of an episode, in order, and the sums over a
  accumulate across them (float32 outputs). Per gate k the contraction over
  the cells is one matmul with the block-diagonal [B*H, B*H] matrix
  kron(I_B, w_h[:, k]), and the broadcasts
  and reductions over a and b are matmuls with 0/1 matrices (compile-time
  constants, at HIGHEST precision so they are exact): only 2D ops on
  lane-dense tiles, which is what Mosaic lowers well.
- The GPU bodies (Triton) work on [rows, H] tiles (Triton needs power-of-two
  sizes; B = 10 is not one, H = 16 is). `layer_step`'s (`_cols_*`): one program
  per output neuron b that walks down the A rows in chunks of 16 with a loop, so
  the sums over a (forward message, d pre_b) stay inside it; the sums over b
  (the parameters' gradients, d fwd_in) are per-program partials that XLA adds
  up afterwards (Triton programs run in parallel, so they cannot accumulate in
  order). `layer_ticks`'s (`_rows_*`): blocks of 16 rows with a static loop over
  b. They need H to be a power of two and at least 16 (Triton's smallest
  matmul), and `layer_step`'s also a power-of-two message size and slot
  counts; otherwise the GPU runs `grid`'s kernels (and XLA ops around them,
  `_step_composed`).

Under vmap (a batch of episodes) the Pallas calls gain a grid axis over the
episodes. 16-bit states are loaded as float32 and stored back in their dtype
(`_compute_dtype`). A Mosaic kernel cannot be partitioned automatically: under
jit on several devices, call it per device (shard_map), as the training step
does. On CPU the wide body runs in Pallas' interpret mode (chosen at
lowering time with `jax.lax.platform_dependent`): that is for testing only
and much slower than `vsml_jax.grid`, which stays the default everywhere.
Nothing here has been run on a TPU or GPU yet: the kernels are checked in
interpret mode and compiled for both without the hardware (tests).

Shapes: h, c [A, B, H]; w_h [H, G]; pre_a [A, G]; pre_b [B, G]; G = 4H;
messages fwd_in [A, m], bwd_in [B, m].
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from vsml_jax import grid
from vsml_jax.config import VSMLConfig
from vsml_jax.params import CellParams
from vsml_jax.state import LayerState

# Outside `layer_step` the messages are the XLA ones (a reduce and a small matmul).
forward_messages = grid.forward_messages
backward_messages = grid.backward_messages

# Rows of the grid per Triton program (a power of two, >= 16 for tl.dot).
GPU_ROWS = 16
# Exact 0/1 selections and sums must not lose bits to a reduced-precision
# matmul (TPU: bf16 passes, GPU: TF32).
_EXACT = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------ per-cell math
def _cell_tick(t_i, t_f, t_g, t_o, c, bound: Optional[float]):
    """One LSTM tick from the tanh of the gate pre-activations (any equal shapes).

    i, f, o are sigmoids written as (1 + tanh(x/2)) / 2 (the halving is in the
    weights, see `grid.scaled_preactivations`). Returns (h, c, c_raw, tanh(c)).
    """
    c_raw = 0.5 * (t_f + 1.0) * c + 0.5 * (t_i + 1.0) * t_g
    c_new = c_raw if bound is None else jnp.clip(c_raw, -bound, bound)
    tc = jnp.tanh(c_new)
    return 0.5 * (t_o + 1.0) * tc, c_new, c_raw, tc


def _clip_grad(c_raw, bound: Optional[float]):
    """d clip / dx as jax.grad gives it (1 inside, 0 outside, 1/2 on the bound)."""
    if bound is None:
        return jnp.ones_like(c_raw)
    a = jnp.abs(c_raw)
    return jnp.where(a < bound, 1.0, jnp.where(a == bound, 0.5, 0.0)).astype(c_raw.dtype)


def _cell_tick_bwd(t, c_prev, c_raw, tc, dh, dc, bound: Optional[float]):
    """Reverse of `_cell_tick`: t = (t_i, t_f, t_g, t_o), dh/dc of its outputs.

    Returns (dz per gate (4 arrays), dc of c_prev); dh of h_prev is
    sum_k dz_k @ w_k^T, which the caller forms (it knows the layout).
    """
    t_i, t_f, t_g, t_o = t
    dc_raw = (dc + dh * 0.5 * (t_o + 1.0) * (1.0 - tc * tc)) * _clip_grad(c_raw, bound)
    # d/dx of (1 + tanh x) / 2 through t is 0.5 * (1 - t^2): the 0.5 is here.
    dt = (0.5 * dc_raw * t_g, 0.5 * dc_raw * c_prev, dc_raw * 0.5 * (t_i + 1.0),
          0.5 * dh * tc)
    dz = tuple(d * (1.0 - tk * tk) for d, tk in zip(dt, t))
    return dz, dc_raw * 0.5 * (t_f + 1.0)


def _dot(a, b, precision=None):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=a.dtype)


def _dot_nt(a, b, precision=None):
    """a [M, K] @ b[N, K]^T."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=a.dtype)


def _dot_tn(a, b, precision=None):
    """a[K, M]^T @ b [K, N]."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=a.dtype)


# ------------------------------------------------------------ compute dtype
def _compute_dtype(dtype):
    """The kernels compute in float32 for 16-bit states (Mosaic's matmuls
    accumulate in 32 bits and v5e has no 16-bit vector unit; Triton likewise),
    else in the state's own dtype."""
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else jnp.dtype(dtype)


class _Cast:
    """A kernel ref that loads as `dtype` and stores in its own dtype."""

    def __init__(self, ref, dtype):
        self._ref, self.dtype = ref, dtype

    @property
    def shape(self):
        return self._ref.shape

    def __getitem__(self, idx):
        return self._ref[idx].astype(self.dtype)

    def __setitem__(self, idx, value):
        self._ref[idx] = value.astype(self._ref.dtype)


def _in_dtype(state_dtype, kernel, *static):
    """functools.partial(kernel, *static) with every ref loaded/stored through
    `_Cast`, computing in `_compute_dtype(state_dtype)`."""
    dtype = _compute_dtype(state_dtype)

    def wrapped(*refs):
        return kernel(*static, *(_Cast(r, dtype) for r in refs))
    return wrapped


# ------------------------------------------------------------ wide body (TPU, CPU)
# The state enters as its transpose [B*H, A] (row b*H + j: unit j of the cells
# of output neuron b; lanes: the A input neurons). XLA's TPU layout of the
# [A, B, H] state keeps A minor (B = 10 and H = 16 tile badly), so this view is
# a bitcast of the loop's carry, where [A, B*H] would cost a transposing copy
# of h and c on the way in and out of every step.
def _wide_constants(B: int, H: int, dtype):
    """0/1 matrices of the wide layout, compile-time constants.

    tile [4, G, B*H]: tile[k][k*H + j, b*H + j] = 1 (gate k's columns spread
    over the B blocks); tile_t [4, B*H, G] its transpose. onehot_b [B, B*H] and
    onehot_t [B*H, B]: block b <-> neuron b. diag [B*H, B*H]: kron(I_B, 1_HxH),
    the cells' own blocks. unit [H, B*H] and unit_t [B*H, H]: unit j of every
    block.
    """
    G, BH = 4 * H, B * H
    tile = np.zeros((4, G, BH), np.float32)
    for k in range(4):
        for b in range(B):
            tile[k, k * H + np.arange(H), b * H + np.arange(H)] = 1
    onehot_b = np.kron(np.eye(B), np.ones((1, H)))
    diag = np.kron(np.eye(B), np.ones((H, H)))
    unit = np.tile(np.eye(H), (1, B))
    return dict((name, jnp.asarray(x, dtype)) for name, x in (
        ("tile", tile), ("tile_t", tile.transpose(0, 2, 1)), ("onehot_b", onehot_b),
        ("onehot_t", onehot_b.T), ("diag", diag), ("unit", unit), ("unit_t", unit.T)))


_FWD_CONSTS = ("tile_t", "onehot_t", "diag", "unit")
_BWD_CONSTS = ("tile", "tile_t", "onehot_b", "onehot_t", "diag", "unit", "unit_t")


def _wide_setup(w_h, pa, pre_b, k_):
    """In-kernel, per gate k: W_k^T = kron(I_B, w_h[:, gate k]^T) [B*H, B*H] and
    pre^T [B*H, A] = pre_a (gate k, repeated over b)^T + pre_b (gate k) column,
    all by exact 0/1 matmuls (no XLA ops per step for the layout)."""
    w_t, pre = [], []
    for k in range(4):
        spread = _dot_nt(k_["tile_t"][k], w_h, _EXACT)          # [BH, H]: w_k^T rows
        w_t.append(_dot(spread, k_["unit"], _EXACT) * k_["diag"])
        pb = jnp.sum(_dot_nt(k_["tile_t"][k], pre_b, _EXACT) * k_["onehot_t"], axis=1,
                     keepdims=True)                              # [BH, 1]
        pre.append(_dot_nt(k_["tile_t"][k], pa, _EXACT) + pb)   # [BH, A]
    return w_t, pre


def _run_ticks(ticks: int, bound, gates, h, c, keep: bool):
    """`ticks` LSTM ticks of the cells of a block, in any layout.

    gates(h) gives the 4 gate pre-activations (i, f, g, o; before the tanh).
    Returns (h, c, tape); with keep, the tape holds each tick's
    (h, c, tanh values, unclipped c, tanh c) for `_reverse_ticks`.
    """
    tape = []
    for _ in range(ticks):
        t = tuple(jnp.tanh(z) for z in gates(h))
        h_new, c_new, c_raw, tc = _cell_tick(*t, c, bound)
        if keep:
            tape.append((h, c, t, c_raw, tc))
        h, c = h_new, c_new
    return h, c, tape


def _reverse_ticks(bound, tape, dh, dc, back, outer, acc):
    """The reverse of `_run_ticks`'s ticks, from their tape.

    back(dz) gives d h of a tick's input from its 4 gate cotangents dz;
    outer(h_prev, dz_k) is the tick's contribution to acc[k] (gate k's part of
    d w_h, in the layout the caller sums). acc: 4 running sums (None: none
    yet). Returns (dh, dc) before the ticks, dpre (per gate, the sum over the
    ticks of dz_k) and acc.
    """
    dpre, acc = [None] * 4, list(acc)
    for h_prev, c_prev, t, c_raw, tc in reversed(tape):
        dz, dc = _cell_tick_bwd(t, c_prev, c_raw, tc, dh, dc, bound)
        dh = back(dz)
        for k in range(4):
            m = outer(h_prev, dz[k])
            acc[k] = m if acc[k] is None else acc[k] + m
            dpre[k] = dz[k] if dpre[k] is None else dpre[k] + dz[k]
    return dh, dc, dpre, acc


def _wide_run_ticks(ticks: int, bound, w_t, pre, h, c, keep: bool):
    """The ticks on h^T, c^T [B*H, A]; with keep, also each tick's tape."""
    return _run_ticks(ticks, bound,
                      lambda h: [_dot(w_t[k], h) + pre[k] for k in range(4)], h, c, keep)


def _lane_mask(A: int, lanes: int):
    """[1, lanes]: which lanes of this program's block are input neurons (< A)."""
    first = pl.program_id(0) * lanes
    return first + jax.lax.broadcasted_iota(jnp.int32, (1, lanes), 1) < A


def _accumulate(out, value, idx=Ellipsis):
    """out[idx] += value, starting from zero in the first lane block."""
    @pl.when(pl.program_id(0) == 0)
    def _():
        out[...] = jnp.zeros(out.shape, out.dtype)
    out[idx] = out[idx] + value


def _wide_fwd_kernel(ticks, bound, names, A, h_ref, c_ref, w_ref, pa_ref, pb_ref, *refs):
    consts = {n: r[...] for n, r in zip(names, refs[:len(names)])}
    h_out, c_out = refs[len(names):]
    valid = _lane_mask(A, h_ref.shape[1])
    zero = lambda x: jnp.where(valid, x, 0.0)
    w_t, pre = _wide_setup(w_ref[...], pa_ref[...], pb_ref[...], consts)
    pre = [zero(p) for p in pre]
    h, c, _ = _wide_run_ticks(ticks, bound, w_t, pre, zero(h_ref[...]), zero(c_ref[...]),
                              False)
    h_out[...] = h
    c_out[...] = c


def _wide_reverse(bound, w_h, k_, tape, dh, dc):
    """The wide body's reverse of the recorded ticks (`_wide_run_ticks`'s tape).

    Returns (dh, dc) before the ticks, dpre (per gate k, the sum over ticks of
    dz_k) and hz (per gate k, the sum over ticks of h_prev dz_k^T [BH, BH], whose
    diagonal blocks hold d w_h).
    """
    # W_k = (W_k^T)^T, built the same way (plain matmuls only, no transposes).
    w = [_dot(k_["unit_t"], _dot(w_h, k_["tile"][k], _EXACT), _EXACT) * k_["diag"]
         for k in range(4)]
    return _reverse_ticks(bound, tape, dh, dc,
                          lambda dz: sum(_dot(w[k], dz[k]) for k in range(4)),
                          lambda h_prev, dz_k: _dot_nt(h_prev, dz_k, _EXACT), [None] * 4)


def _wide_bwd_kernel(ticks, bound, names, A, h_ref, c_ref, w_ref, pa_ref, pb_ref, *refs):
    n = len(names)
    k_ = {name: r[...] for name, r in zip(names, refs[:n])}
    dh_ref, dc_ref, dh_out, dc_out, dpa_out, dpb_out, dw_out = refs[n:]
    valid = _lane_mask(A, h_ref.shape[1])
    zero = lambda x: jnp.where(valid, x, 0.0)
    w_t, pre = _wide_setup(w_ref[...], pa_ref[...], pb_ref[...], k_)
    pre = [zero(p) for p in pre]
    _, _, tape = _wide_run_ticks(ticks, bound, w_t, pre, zero(h_ref[...]),
                                 zero(c_ref[...]), True)
    dh, dc, dpre, hz = _wide_reverse(bound, w_ref[...], k_, tape, zero(dh_ref[...]),
                                     zero(dc_ref[...]))
    dh_out[...] = dh
    dc_out[...] = dc
    # Sum over b: [G, A'], gate k's blocks summed into its G rows.
    dpa_out[...] = sum(_dot(k_["tile"][k], dpre[k], _EXACT) for k in range(4))
    # Sum over a (lanes), then block b to row b: [B, G].
    _accumulate(dpb_out, sum(_dot(k_["onehot_b"], jnp.sum(dpre[k], axis=1, keepdims=True)
                                  * k_["tile_t"][k], _EXACT) for k in range(4)))
    # Sum over cells: the diagonal blocks of h dz^T, summed over b: [H, G].
    _accumulate(dw_out, sum(_dot(_dot(k_["unit"], hz[k] * k_["diag"], _EXACT),
                                 k_["tile_t"][k], _EXACT) for k in range(4)))


# h, c (and in the reverse dh, dc) are updated in place: without the alias XLA
# copies both into fresh buffers before every call, so that the kernel's output
# can take the loop carry's place (two extra kernels per step on TPU).
_IN_PLACE = {0: 0, 1: 1}


def _transposed(x):
    """[A, B, H] -> [B*H, A]."""
    A = x.shape[0]
    return x.reshape(A, -1).T


def _untransposed(x, B, H):
    """[B*H, A] -> [A, B, H]."""
    return x.T.reshape(-1, B, H)


# Input neurons per TPU program (lanes): one episode's whole tape of the reverse
# for 784 x 10 x 16 cells is ~20 MB, more than v4's 16 MiB of VMEM; blocks of
# 256 lanes need ~7 MB. A multiple of 128 (the lane width).
TPU_LANES = 256


def _lane_blocks(A: int) -> Tuple[int, int]:
    """(lanes per block, number of blocks) for A input neurons."""
    lanes = A if A <= TPU_LANES else TPU_LANES
    return lanes, -(-A // lanes)


def _whole(shape):
    """The whole array in every program (grid of one axis)."""
    return pl.BlockSpec(shape, lambda i: (0,) * len(shape))


def _lanes(rows: int, lanes: int):
    """Rows x the program's block of lanes."""
    return pl.BlockSpec((rows, lanes), lambda i: (0, i))


def _wide_call(cfg: VSMLConfig, w_h, pre_a, pre_b, h, c, interpret: bool):
    """Forward in the wide layout: (h, c) [A, B, H]."""
    A, B, H = h.shape
    BH = B * H
    lanes, n = _lane_blocks(A)
    consts = _wide_constants(B, H, _compute_dtype(h.dtype))
    args = (_transposed(h), _transposed(c), w_h, pre_a, pre_b) + tuple(
        consts[k] for k in _FWD_CONSTS)
    in_specs = ([_lanes(BH, lanes)] * 2 + [_whole(w_h.shape)]
                + [pl.BlockSpec((lanes, pre_a.shape[1]), lambda i: (i, 0))]
                + [_whole(a.shape) for a in args[4:]])
    out = jax.ShapeDtypeStruct((BH, A), h.dtype)
    h2, c2 = pl.pallas_call(
        _in_dtype(h.dtype, _wide_fwd_kernel, cfg.micro_ticks, cfg.state_clip, _FWD_CONSTS,
                  A),
        out_shape=(out, out), grid=(n,), in_specs=in_specs,
        out_specs=(_lanes(BH, lanes), _lanes(BH, lanes)), interpret=interpret,
        input_output_aliases=_IN_PLACE, compiler_params=_tpu_params(),
        name="vsml_ticks")(*args)
    return _untransposed(h2, B, H), _untransposed(c2, B, H)


def _wide_call_bwd(cfg: VSMLConfig, w_h, pre_a, pre_b, h, c, dh, dc, interpret: bool):
    """Reverse in the wide layout: (dw [H, G], dpre_a [A, G], dpre_b [B, G], dh, dc)."""
    A, B, H = h.shape
    BH, G = B * H, 4 * H
    lanes, n = _lane_blocks(A)
    consts = _wide_constants(B, H, _compute_dtype(h.dtype))
    args = ((_transposed(h), _transposed(c), w_h, pre_a, pre_b)
            + tuple(consts[k] for k in _BWD_CONSTS) + (_transposed(dh), _transposed(dc)))
    in_specs = ([_lanes(BH, lanes)] * 2 + [_whole(w_h.shape)]
                + [pl.BlockSpec((lanes, G), lambda i: (i, 0)), _whole(pre_b.shape)]
                + [_whole(consts[k].shape) for k in _BWD_CONSTS] + [_lanes(BH, lanes)] * 2)
    out_shape = (jax.ShapeDtypeStruct((BH, A), h.dtype),) * 2 + (
        jax.ShapeDtypeStruct((G, A), h.dtype), jax.ShapeDtypeStruct((B, G), jnp.float32),
        jax.ShapeDtypeStruct((H, G), jnp.float32))
    out_specs = (_lanes(BH, lanes),) * 2 + (_lanes(G, lanes), _whole((B, G)),
                                            _whole((H, G)))
    dh2, dc2, dpa, dpb, dw = pl.pallas_call(
        _in_dtype(h.dtype, _wide_bwd_kernel, cfg.micro_ticks, cfg.state_clip, _BWD_CONSTS,
                  A),
        out_shape=out_shape, grid=(n,), in_specs=in_specs, out_specs=out_specs,
        input_output_aliases={len(args) - 2: 0, len(args) - 1: 1}, interpret=interpret,
        compiler_params=_tpu_params(), name="vsml_ticks_bwd")(*args)
    return (dw.astype(h.dtype), dpa.T, dpb.astype(h.dtype), _untransposed(dh2, B, H),
            _untransposed(dc2, B, H))


# ------------------------------------------------------------ fused layer step (TPU, CPU)
# `layer_step`: the message projections (pre_a = fwd_in @ w_f, pre_b = bwd_in @
# w_b + bias), the ticks and the forward message reduce_a(h) @ c_fwd in one
# kernel, and all of their reverse in one more, so that a time step of a layer
# has no XLA kernels of its own left.
_STEP_FWD_CONSTS = ("tile_t", "onehot_b", "onehot_t", "diag", "unit", "unit_t")
_STEP_BWD_CONSTS = _BWD_CONSTS


def _rows_of(slots, m: int) -> Tuple[int, ...]:
    """The message columns a kernel reads: `slots`, or all m when unknown."""
    return tuple(range(m)) if slots is None else tuple(slots)


def _project_rows(sel, w_ref, rows, msg_t):
    """sel [BH, G] (gate k spread over b) applied to msg_t [n, N] @ w[rows] -> [BH, N].

    msg_t holds the message columns `rows` as rows (the others are zero); with
    one or two of them this is one or two broadcast products, no matmul.
    """
    out = None
    for i, r in enumerate(rows):
        q = _dot_nt(sel, w_ref[pl.ds(r, 1), :], _EXACT)             # [BH, 1]
        term = q * msg_t[i:i + 1, :]
        out = term if out is None else out + term
    return out


def _step_setup(w_h, w_f_ref, w_b_ref, bias, fwd_t, bwd_t, rows, k_):
    """Per gate k: W_k^T [BH, BH] and pre^T [BH, A] from the messages (in-kernel).

    fwd_t [nf, A], bwd_t [nb, B]: the message columns rows[0], rows[1] as rows.
    """
    w_t, pre = [], []
    for k in range(4):
        sel = k_["tile_t"][k]                                        # [BH, G]
        w_t.append(_dot(_dot_nt(sel, w_h, _EXACT), k_["unit"], _EXACT) * k_["diag"])
        pa = _project_rows(sel, w_f_ref, rows[0], fwd_t)             # [BH, A]
        pb = jnp.sum(_project_rows(sel, w_b_ref, rows[1], bwd_t) * k_["onehot_t"],
                     axis=1, keepdims=True) + _dot_nt(sel, bias, _EXACT)   # [BH, 1]
        pre.append(pa + pb)
    return w_t, pre


def _step_message(h, c_fwd, scale, k_):
    """(reduce_a(h) @ c_fwd)^T [m, B] from h^T [BH, A'] (a block of A' lanes: its
    part of the sum); also (column sums * scale [BH, 1], c_fwd's rows per block
    [BH, m]) for the reverse."""
    col = jnp.sum(h, axis=1, keepdims=True) * scale                  # [BH, 1]
    c_rows = _dot(k_["unit_t"], c_fwd, _EXACT)                       # [BH, m]
    return _dot_tn(col * c_rows, k_["onehot_t"], _EXACT), col, c_rows


def _step_fwd_kernel(ticks, bound, scale, rows, names, A, h_ref, c_ref, w_h_ref, w_f_ref,
                     w_b_ref, bias_ref, c_fwd_ref, fwd_ref, bwd_ref, *refs):
    k_ = {n: r[...] for n, r in zip(names, refs[:len(names)])}
    h_out, c_out, msg_out = refs[len(names):]
    # Lanes past A (the last block of a grid that does not divide A) hold
    # whatever is there: zero them, so that they add nothing to the sums.
    valid = _lane_mask(A, h_ref.shape[1])
    zero = lambda x: jnp.where(valid, x, 0.0)
    w_t, pre = _step_setup(w_h_ref[...], w_f_ref, w_b_ref, bias_ref[...],
                           zero(fwd_ref[...]), bwd_ref[...], rows, k_)
    h, c, _ = _wide_run_ticks(ticks, bound, w_t, pre, zero(h_ref[...]), zero(c_ref[...]),
                              False)
    h_out[...] = h
    c_out[...] = c
    _accumulate(msg_out, _step_message(zero(h), c_fwd_ref[...], scale, k_)[0])


def _step_bwd_kernel(ticks, bound, scale, rows, names, A, h_ref, c_ref, w_h_ref, w_f_ref,
                     w_b_ref, bias_ref, c_fwd_ref, fwd_ref, bwd_ref, *refs):
    n = len(names)
    k_ = {name: r[...] for name, r in zip(names, refs[:n])}
    (dh_ref, dc_ref, dmsg_ref, dh_out, dc_out, dfwd_out, dbwd_out, dw_h_out, dw_f_out,
     dw_b_out, dbias_out, dc_fwd_out) = refs[n:]
    valid = _lane_mask(A, h_ref.shape[1])
    zero = lambda x: jnp.where(valid, x, 0.0)
    w_h, fwd_t, bwd_t = w_h_ref[...], zero(fwd_ref[...]), bwd_ref[...]
    w_t, pre = _step_setup(w_h, w_f_ref, w_b_ref, bias_ref[...], fwd_t, bwd_t, rows, k_)
    h, _, tape = _wide_run_ticks(ticks, bound, w_t, pre, zero(h_ref[...]),
                                 zero(c_ref[...]), True)
    # The forward message: d c_fwd, and its part of dh (the same for every a).
    _, col, c_rows = _step_message(zero(h), c_fwd_ref[...], scale, k_)
    dmsg_rows = _dot_nt(k_["onehot_t"], dmsg_ref[...], _EXACT)      # [BH, m]
    _accumulate(dc_fwd_out, _dot(k_["unit"], col * dmsg_rows, _EXACT))
    dh = zero(dh_ref[...] + scale * jnp.sum(dmsg_rows * c_rows, axis=1, keepdims=True))
    dh, dc, dpre, hz = _wide_reverse(bound, w_h, k_, tape, dh, zero(dc_ref[...]))
    dh_out[...] = dh
    dc_out[...] = dc
    _accumulate(dw_h_out, sum(_dot(_dot(k_["unit"], hz[k] * k_["diag"], _EXACT),
                                   k_["tile_t"][k], _EXACT) for k in range(4)))
    # pre_a = fwd_in @ w_f: through d pre_a^T [G, A'] (sum over b).
    dpa_t = sum(_dot(k_["tile"][k], dpre[k], _EXACT) for k in range(4))
    # pre_b = bwd_in @ w_b + bias: through the sums over a, block b to row b.
    dpb = sum(_dot(k_["onehot_b"], jnp.sum(dpre[k], axis=1, keepdims=True)
                   * k_["tile_t"][k], _EXACT) for k in range(4))     # [B, G]
    _accumulate(dbias_out, jnp.sum(dpb, axis=0, keepdims=True))      # [1, G]
    _accumulate(dbwd_out, jnp.zeros(dbwd_out.shape, dbwd_out.dtype))
    _accumulate(dw_f_out, jnp.zeros(dw_f_out.shape, dw_f_out.dtype))
    _accumulate(dw_b_out, jnp.zeros(dw_b_out.shape, dw_b_out.dtype))
    for i, r in enumerate(rows[0]):
        rr = pl.ds(r, 1)
        dw_f_out[rr, :] = dw_f_out[rr, :] + _dot_nt(fwd_t[i:i + 1, :], dpa_t, _EXACT)
        dfwd_out[pl.ds(i, 1), :] = _dot(w_f_ref[rr, :], dpa_t, _EXACT)
    for i, r in enumerate(rows[1]):
        rr, ri = pl.ds(r, 1), pl.ds(i, 1)
        dw_b_out[rr, :] = dw_b_out[rr, :] + _dot(bwd_t[i:i + 1, :], dpb, _EXACT)
        dbwd_out[ri, :] = dbwd_out[ri, :] + _dot_nt(w_b_ref[rr, :], dpb, _EXACT)


def _step_scale(cfg: VSMLConfig, A: int) -> float:
    return 1.0 / A if cfg.reduce == "mean" else 1.0


def _message_rows(msg, rows):
    """msg [N, m] -> its columns `rows` as rows [len(rows), N] (static slices: XLA
    reads them straight from the message's producer; list indexing would gather).
    Concatenated rather than stacked: under vmap the episode axis then stays in
    front, where the Pallas TPU lowering needs it."""
    return jnp.concatenate([msg[:, r][None] for r in rows], axis=0)


def _message_cotangent(d_rows, rows, m: int):
    """[len(rows), N] cotangent of `_message_rows` -> [N, m] (zero elsewhere)."""
    zero = jnp.zeros_like(d_rows[0])
    by_col = {r: d_rows[i] for i, r in enumerate(rows)}
    return jnp.stack([by_col.get(k, zero) for k in range(m)], axis=1)


def _step_call(cfg, slots, w_h, w_f, w_b, bias, c_fwd, fwd_in, bwd_in, h, c,
               interpret: bool):
    """Fused forward: (h, c) [A, B, H] and the forward message [B, m].

    h, c are updated in place (_IN_PLACE). Under jax.grad the forward steps and
    the recomputation run the custom VJP's forward rule too, where the alias
    saves XLA's copies of h and c; in the backward steps it costs two copies
    (the reverse still needs the inputs), fewer than it saves. Sums over the
    lane blocks accumulate in float32 outputs.
    """
    A, B, H = h.shape
    m, BH = c_fwd.shape[1], B * H
    rows = (_rows_of(slots[0], m), _rows_of(slots[1], m))
    lanes, n = _lane_blocks(A)
    consts = _wide_constants(B, H, _compute_dtype(h.dtype))
    params = (w_h, w_f, w_b, bias[None], c_fwd)
    fwd_t, bwd_t = _message_rows(fwd_in, rows[0]), _message_rows(bwd_in, rows[1])
    args = (_transposed(h), _transposed(c)) + params + (fwd_t, bwd_t) + tuple(
        consts[k] for k in _STEP_FWD_CONSTS)
    in_specs = ([_lanes(BH, lanes)] * 2 + [_whole(a.shape) for a in params]
                + [_lanes(len(rows[0]), lanes), _whole(bwd_t.shape)]
                + [_whole(consts[k].shape) for k in _STEP_FWD_CONSTS])
    h2, c2, msg_t = pl.pallas_call(
        _in_dtype(h.dtype, _step_fwd_kernel, cfg.micro_ticks, cfg.state_clip,
                  _step_scale(cfg, A), rows, _STEP_FWD_CONSTS, A),
        out_shape=(jax.ShapeDtypeStruct((BH, A), h.dtype),) * 2 + (
            jax.ShapeDtypeStruct((m, B), jnp.float32),),
        grid=(n,), in_specs=in_specs,
        out_specs=(_lanes(BH, lanes), _lanes(BH, lanes), _whole((m, B))),
        input_output_aliases=_IN_PLACE, interpret=interpret,
        compiler_params=_tpu_params(), name="vsml_layer_step")(*args)
    return _untransposed(h2, B, H), _untransposed(c2, B, H), msg_t.T.astype(h.dtype)


def _step_call_bwd(cfg, slots, w_h, w_f, w_b, bias, c_fwd, fwd_in, bwd_in, h, c, dh, dc,
                   dmsg, interpret: bool):
    """Fused reverse: cotangents of (w_h, w_f, w_b, bias, c_fwd, fwd_in, bwd_in, h, c)."""
    A, B, H = h.shape
    m, G, BH = c_fwd.shape[1], 4 * H, B * H
    rows = (_rows_of(slots[0], m), _rows_of(slots[1], m))
    nf, nb = len(rows[0]), len(rows[1])
    lanes, n = _lane_blocks(A)
    consts = _wide_constants(B, H, _compute_dtype(h.dtype))
    params = (w_h, w_f, w_b, bias[None], c_fwd)
    fwd_t, bwd_t = _message_rows(fwd_in, rows[0]), _message_rows(bwd_in, rows[1])
    args = ((_transposed(h), _transposed(c)) + params + (fwd_t, bwd_t)
            + tuple(consts[k] for k in _STEP_BWD_CONSTS)
            + (_transposed(dh), _transposed(dc), dmsg.T))
    in_specs = ([_lanes(BH, lanes)] * 2 + [_whole(a.shape) for a in params]
                + [_lanes(nf, lanes), _whole(bwd_t.shape)]
                + [_whole(consts[k].shape) for k in _STEP_BWD_CONSTS]
                + [_lanes(BH, lanes)] * 2 + [_whole((m, B))])
    sums = ((nb, B), (H, G), (m, G), (m, G), (1, G), (H, m))  # accumulated over blocks
    out_shape = tuple(jax.ShapeDtypeStruct(s, h.dtype) for s in ((BH, A), (BH, A), (nf, A)))
    out_shape += tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in sums)
    out_specs = (_lanes(BH, lanes),) * 2 + (_lanes(nf, lanes),) + tuple(
        _whole(s) for s in sums)
    n_in = len(args)
    dh2, dc2, dfwd, dbwd, dw_h, dw_f, dw_b, dbias, dc_fwd = pl.pallas_call(
        _in_dtype(h.dtype, _step_bwd_kernel, cfg.micro_ticks, cfg.state_clip,
                  _step_scale(cfg, A), rows, _STEP_BWD_CONSTS, A),
        out_shape=out_shape, grid=(n,), in_specs=in_specs, out_specs=out_specs,
        input_output_aliases={n_in - 3: 0, n_in - 2: 1}, interpret=interpret,
        compiler_params=_tpu_params(), name="vsml_layer_step_bwd")(*args)
    # The message columns outside `rows` are zero by contract; their cotangent
    # is left zero too (as for grid's slot form, which never reads them).
    d_fwd_in = _message_cotangent(dfwd, rows[0], m)
    d_bwd_in = _message_cotangent(dbwd.astype(h.dtype), rows[1], m)
    cast = lambda x: x.astype(h.dtype)
    return (cast(dw_h), cast(dw_f), cast(dw_b), cast(dbias[0]), cast(dc_fwd), d_fwd_in,
            d_bwd_in, _untransposed(dh2, B, H), _untransposed(dc2, B, H))


def _step_composed(cfg, slots, ticks, w_h, w_f, w_b, bias, c_fwd, fwd_in, bwd_in, h, c):
    """The fused step as XLA ops around `ticks` (the GPU body, or grid's kernel)."""
    pa = grid._project(fwd_in, w_f, slots[0])
    pb = grid._project(bwd_in, w_b, slots[1]) + bias
    h2, c2 = ticks(cfg, w_h, pa, pb, h, c)
    msg = grid._reduce(h2, 0, cfg.reduce) @ c_fwd
    return h2, c2, msg


def _gpu_ticks(cfg):
    return rows_lstm_ticks if rows_body_supported(cfg.hidden_size) else grid._lstm_ticks


def _cols_supported(cfg, slots) -> bool:
    m = cfg.msg_size
    return cols_body_supported(cfg.hidden_size, m, (_rows_of(slots[0], m),
                                                    _rows_of(slots[1], m)))


def _step_any(cfg, slots, *args):
    gpu = (functools.partial(_cols_call, cfg, slots) if _cols_supported(cfg, slots)
           else functools.partial(_step_composed, cfg, slots, _gpu_ticks(cfg)))
    return jax.lax.platform_dependent(
        *args, cpu=functools.partial(_step_call, cfg, slots, interpret=True), cuda=gpu,
        rocm=gpu, default=functools.partial(_step_call, cfg, slots, interpret=False))


def _step_any_bwd(cfg, slots, *args_and_cts):
    def composed(*a):
        _, vjp = jax.vjp(functools.partial(_step_composed, cfg, slots, _gpu_ticks(cfg)),
                         *a[:9])
        return vjp(a[9:])
    gpu = (functools.partial(_cols_call_bwd, cfg, slots) if _cols_supported(cfg, slots)
           else composed)
    return jax.lax.platform_dependent(
        *args_and_cts, cpu=functools.partial(_step_call_bwd, cfg, slots, interpret=True),
        cuda=gpu, rocm=gpu,
        default=functools.partial(_step_call_bwd, cfg, slots, interpret=False))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def fused_step(cfg: VSMLConfig, slots, w_h, w_f, w_b, bias, c_fwd, fwd_in, bwd_in, h, c):
    """Projections, ticks and forward message of an LSTM layer, one kernel each way.

    Args (gate-scaled like `grid.GateScaledParams`): w_h [H, G], w_f, w_b [m, G],
    bias [G], c_fwd [H, m]; fwd_in [A, m]; bwd_in [B, m]; h, c [A, B, H];
    slots: (fwd_slots, bwd_slots): the message columns that can be non-zero (None:
    any; see `grid._project`); the kernels read only those.
    Returns: (h, c) [A, B, H] after the ticks and reduce_a(h) @ c_fwd [B, m].
    """
    return _step_any(cfg, slots, w_h, w_f, w_b, bias, c_fwd, fwd_in, bwd_in, h, c)


def _fused_step_fwd(cfg, slots, *args):
    return _step_any(cfg, slots, *args), args


def _fused_step_bwd(cfg, slots, res, cts):
    return tuple(_step_any_bwd(cfg, slots, *res, *cts))


fused_step.defvjp(_fused_step_fwd, _fused_step_bwd)


def layer_step(p: CellParams, cfg: VSMLConfig, s: LayerState, fwd_in: jax.Array,
               bwd_in: jax.Array, layer_index: int, fwd_slots: grid.Slots = None,
               bwd_slots: grid.Slots = None) -> Tuple[LayerState, jax.Array]:
    """`layer_ticks` and then `forward_messages`: (new LayerState, [B, m]).

    For an LSTM without coordinate features (and u_bwd not needed here) this is
    `fused_step`: on TPU the message projections, ticks and forward message are
    one Pallas kernel, their reverse one more. Otherwise the two calls.
    """
    if cfg.cell != "lstm" or p.w_coord is not None:
        s = layer_ticks(p, cfg, s, fwd_in, bwd_in, layer_index, fwd_slots, bwd_slots)
        return s, forward_messages(p, cfg, s)
    p = grid.gate_scaled(p, cfg)
    h, c, msg = fused_step(cfg, (fwd_slots, bwd_slots), p.w_h, p.w_f, p.w_b, p.bias,
                           p.c_fwd, fwd_in, bwd_in, s.h, s.c)
    return LayerState(h=h, c=c), msg


def _tpu_params():
    """Mosaic settings: the lane-block axis accumulates the sums over a, so its
    programs run in order ("arbitrary"; vmap puts the episode axis in front)."""
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=("arbitrary",))


# ------------------------------------------------------------ rows body (GPU)
def _tile_ticks(ticks: int, bound, w, pre, h, c, keep: bool):
    """The ticks of a [rows, H] tile (the GPU bodies): gate k is h @ w[k] + pre[k]."""
    return _run_ticks(ticks, bound,
                      lambda h: [_dot(h, w[k]) + pre[k] for k in range(4)], h, c, keep)


def _tile_reverse(bound, w, tape, dh, dc, dw):
    """`_reverse_ticks` of a [rows, H] tile; dw: the 4 running [H, H] sums of
    h^T dz_k (None: none yet)."""
    return _reverse_ticks(bound, tape, dh, dc,
                          lambda dz: sum(_dot_nt(dz[k], w[k]) for k in range(4)),
                          lambda h_prev, dz_k: _dot_tn(h_prev, dz_k, _EXACT), dw)


def _rows_fwd_kernel(ticks, bound, B, H, h_ref, c_ref, w_ref, pa_ref, pb_ref,
                     h_out, c_out):
    rows = pl.ds(pl.program_id(0) * GPU_ROWS, GPU_ROWS)
    w = [w_ref[k] for k in range(4)]                                  # [H, H]
    pa = [pa_ref[rows, pl.ds(k * H, H)] for k in range(4)]            # [R, H]
    for b in range(B):
        cols = pl.ds(b * H, H)
        pre = [pa[k] + pb_ref[pl.ds(4 * b + k, 1), :] for k in range(4)]
        h, c, _ = _tile_ticks(ticks, bound, w, pre, h_ref[rows, cols], c_ref[rows, cols],
                              False)
        h_out[rows, cols] = h
        c_out[rows, cols] = c


def _rows_bwd_kernel(ticks, bound, B, H, h_ref, c_ref, w_ref, pa_ref, pb_ref, dh_ref,
                     dc_ref, dh_out, dc_out, dpa_out, dpb_out, dw_out):
    i = pl.program_id(0)
    rows = pl.ds(i * GPU_ROWS, GPU_ROWS)
    w = [w_ref[k] for k in range(4)]
    pa = [pa_ref[rows, pl.ds(k * H, H)] for k in range(4)]
    dw = [None] * 4
    dpa = [None] * 4
    for b in range(B):
        cols = pl.ds(b * H, H)
        pre = [pa[k] + pb_ref[pl.ds(4 * b + k, 1), :] for k in range(4)]
        _, _, tape = _tile_ticks(ticks, bound, w, pre, h_ref[rows, cols],
                                 c_ref[rows, cols], True)
        dh, dc, dpre, dw = _tile_reverse(bound, w, tape, dh_ref[rows, cols],
                                         dc_ref[rows, cols], dw)
        dh_out[rows, cols] = dh
        dc_out[rows, cols] = dc
        for k in range(4):
            dpa[k] = dpre[k] if dpa[k] is None else dpa[k] + dpre[k]
            dpb_out[pl.ds(i * 4 * B + 4 * b + k, 1), :] = jnp.sum(dpre[k], axis=0,
                                                                  keepdims=True)
    for k in range(4):
        dpa_out[rows, pl.ds(k * H, H)] = dpa[k]
        dw_out[pl.ds(i * 4 + k, 1), :, :] = dw[k][None]


def _rows_setup(w_h, pre_a, pre_b, h, c):
    """Row padding to a multiple of GPU_ROWS and the per-gate weights."""
    A, B, H = h.shape
    pad = (-A) % GPU_ROWS
    rows = lambda x: jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)) if pad else x
    w4 = w_h.reshape(H, 4, H).transpose(1, 0, 2)                      # [4, H, H]
    pb = pre_b.reshape(4 * B, H)                                      # row 4b + k
    return A + pad, rows, w4, pb


def _rows_call(cfg: VSMLConfig, w_h, pre_a, pre_b, h, c, interpret: bool = False):
    A, B, H = h.shape
    Ap, rows, w4, pb = _rows_setup(w_h, pre_a, pre_b, h, c)
    flat = lambda x: rows(x.reshape(A, B * H))
    out = jax.ShapeDtypeStruct((Ap, B * H), h.dtype)
    h2, c2 = pl.pallas_call(
        _in_dtype(h.dtype, _rows_fwd_kernel, cfg.micro_ticks, cfg.state_clip, B, H),
        out_shape=(out, out), grid=(Ap // GPU_ROWS,), interpret=interpret,
        input_output_aliases=_IN_PLACE, compiler_params=_triton_params(),
        name="vsml_ticks")(flat(h), flat(c), w4, rows(pre_a), pb)
    return h2[:A].reshape(A, B, H), c2[:A].reshape(A, B, H)


def _rows_call_bwd(cfg: VSMLConfig, w_h, pre_a, pre_b, h, c, dh, dc,
                   interpret: bool = False):
    A, B, H = h.shape
    G = 4 * H
    Ap, rows, w4, pb = _rows_setup(w_h, pre_a, pre_b, h, c)
    n = Ap // GPU_ROWS
    flat = lambda x: rows(x.reshape(A, B * H))
    dt = h.dtype
    shapes = ((Ap, B * H), (Ap, B * H), (Ap, G), (n * 4 * B, H), (n * 4, H, H))
    dh2, dc2, dpa, dpb, dw = pl.pallas_call(
        _in_dtype(h.dtype, _rows_bwd_kernel, cfg.micro_ticks, cfg.state_clip, B, H),
        out_shape=tuple(jax.ShapeDtypeStruct(s, dt) for s in shapes), grid=(n,),
        input_output_aliases={5: 0, 6: 1}, interpret=interpret,
        compiler_params=_triton_params(), name="vsml_ticks_bwd")(
            flat(h), flat(c), w4, rows(pre_a), pb, flat(dh), flat(dc))
    # Per-block partials of the sums over cells, summed here.
    dpb = dpb.reshape(n, B, G).sum(axis=0)
    dw = dw.reshape(n, 4, H, H).sum(axis=0).transpose(1, 0, 2).reshape(H, G)
    return (dw, dpa[:A], dpb, dh2[:A].reshape(A, B, H), dc2[:A].reshape(A, B, H))


def _triton_params():
    """The Triton lowering (this JAX's default GPU lowering is Mosaic GPU, which
    does not take a vmapped grid)."""
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=4, num_stages=1)


def rows_body_supported(H: int) -> bool:
    """Whether the GPU body handles hidden size H (a power of two, >= 16)."""
    return H >= 16 and H & (H - 1) == 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def rows_lstm_ticks(cfg: VSMLConfig, w_h, pre_a, pre_b, h, c):
    """`grid._lstm_ticks` with the GPU (Triton) body each way (same shapes)."""
    return _rows_call(cfg, w_h, pre_a, pre_b, h, c)


rows_lstm_ticks.defvjp(
    lambda cfg, *a: (_rows_call(cfg, *a), a),
    lambda cfg, res, cts: _rows_call_bwd(cfg, *res, *cts))


# ------------------------------------------------------------ fused layer step (GPU)
# One Triton program per output neuron b (and episode): it walks down the A rows
# of its column block in chunks of GPU_ROWS with a loop, so the sums over a
# (the forward message, d pre_b) stay inside the program. The sums over b (the
# parameters' gradients, d fwd_in) are per-program partials that XLA adds up:
# the parameters' in one packed array (one reduction).
def _cols_setup(b, H, rows, w_h_ref, w_f_ref, w_b_ref, bias_ref, bwd_ref):
    """Per gate k: w_h's [H, H] block, pre_b[b] [1, H], and w_f's rows [1, H]."""
    gate = lambda k: pl.ds(k * H, H)
    w = [w_h_ref[:, gate(k)] for k in range(4)]
    pb = []
    for k in range(4):
        v = bias_ref[:, gate(k)]
        for j, r in enumerate(rows[1]):
            v = v + bwd_ref[pl.ds(b, 1), pl.ds(j, 1)] * w_b_ref[pl.ds(r, 1), gate(k)]
        pb.append(v)
    wf = [[w_f_ref[pl.ds(r, 1), gate(k)] for r in rows[0]] for k in range(4)]
    return w, pb, wf


def _cols_chunk(i, A, H, rows, fwd_ref, pb, wf):
    """Row chunk i: (row slice, valid-row mask [R, 1], pre-activations per gate [R, H])."""
    R = GPU_ROWS
    r = pl.ds(i * R, R)
    valid = (i * R + jax.lax.broadcasted_iota(jnp.int32, (R, 1), 0)) < A
    x = [fwd_ref[r, pl.ds(j, 1)] for j in range(len(rows[0]))]          # [R, 1]
    pre = []
    for k in range(4):
        v = pb[k]
        for xi, w in zip(x, wf[k]):
            v = v + xi * w
        pre.append(jnp.broadcast_to(v, (R, H)))
    return r, valid, x, pre


def _cols_fwd_kernel(ticks, bound, scale, A, rows, h_ref, c_ref, w_h_ref, w_f_ref,
                     w_b_ref, bias_ref, c_fwd_ref, fwd_ref, bwd_ref, h_out, c_out, msg_out):
    b = pl.program_id(0)
    H = w_h_ref.shape[0]
    cols = pl.ds(b * H, H)
    w, pb, wf = _cols_setup(b, H, rows, w_h_ref, w_f_ref, w_b_ref, bias_ref, bwd_ref)

    def chunk(i, hsum):
        r, valid, _, pre = _cols_chunk(i, A, H, rows, fwd_ref, pb, wf)
        h, c, _ = _tile_ticks(ticks, bound, w, pre, h_ref[r, cols], c_ref[r, cols], False)
        h_out[r, cols] = h
        c_out[r, cols] = c
        return hsum + jnp.sum(jnp.where(valid, h, 0.0), axis=0, keepdims=True)

    hsum = jax.lax.fori_loop(0, h_ref.shape[0] // GPU_ROWS, chunk,
                             jnp.zeros((1, H), h_ref.dtype))
    # reduce_a(h)[b] @ c_fwd as a broadcast product and a sum over H (no 1-row dot).
    msg_out[pl.ds(b, 1), :] = scale * jnp.sum(hsum.T * c_fwd_ref[...], axis=0,
                                              keepdims=True)


def _cols_bwd_kernel(ticks, bound, scale, A, rows, h_ref, c_ref, w_h_ref, w_f_ref,
                     w_b_ref, bias_ref, c_fwd_ref, fwd_ref, bwd_ref, dh_ref, dc_ref,
                     dmsg_ref, dh_out, dc_out, dfwd_out, dbwd_out, grads_out):
    b = pl.program_id(0)
    H = w_h_ref.shape[0]
    cols = pl.ds(b * H, H)
    nf = len(rows[0])
    w, pb, wf = _cols_setup(b, H, rows, w_h_ref, w_f_ref, w_b_ref, bias_ref, bwd_ref)
    dmsg = dmsg_ref[pl.ds(b, 1), :]                                     # [1, m]
    # d reduce_a(h)[b] = scale * c_fwd @ dmsg^T, as a row [1, H].
    dh_msg = scale * jnp.sum(c_fwd_ref[...] * dmsg, axis=1, keepdims=True).T

    def chunk(i, acc):
        hsum, dw, dpb, dwf = acc
        r, valid, x, pre = _cols_chunk(i, A, H, rows, fwd_ref, pb, wf)
        h, _, tape = _tile_ticks(ticks, bound, w, pre, h_ref[r, cols], c_ref[r, cols], True)
        hsum = hsum + jnp.sum(jnp.where(valid, h, 0.0), axis=0, keepdims=True)
        dh = dh_ref[r, cols] + jnp.where(valid, dh_msg, 0.0)
        dh, dc, dpre, dw = _tile_reverse(bound, w, tape, dh, dc_ref[r, cols], dw)
        dh_out[r, cols] = dh
        dc_out[r, cols] = dc
        dpb = tuple(dpb[k] + jnp.sum(dpre[k], axis=0, keepdims=True) for k in range(4))
        dwf = tuple(tuple(dwf[j][k] + jnp.sum(x[j] * dpre[k], axis=0, keepdims=True)
                          for k in range(4)) for j in range(nf))
        # d fwd_in[a, rows[0][j]] from this column block (summed over b by XLA).
        for j in range(nf):
            dfwd_out[pl.ds(b, 1), r, pl.ds(j, 1)] = sum(
                jnp.sum(dpre[k] * wf[k][j], axis=1, keepdims=True) for k in range(4))[None]
        return hsum, tuple(dw), dpb, dwf

    zrow = jnp.zeros((1, H), h_ref.dtype)
    init = (zrow, tuple(jnp.zeros((H, H), h_ref.dtype) for _ in range(4)),
            (zrow,) * 4, tuple((zrow,) * 4 for _ in range(nf)))
    hsum, dw, dpb, dwf = jax.lax.fori_loop(0, h_ref.shape[0] // GPU_ROWS, chunk, init)
    # Packed partial gradients of this b (`_cols_unpack`): rows [0, 4H) d w_h
    # (gate blocks), 4 rows d bias, 4m rows d w_f and 4m rows d w_b (row 4r + k:
    # message row r, gate k; zero for rows no slot uses), m rows d c_fwd^T.
    m = dmsg.shape[1]
    zrow = jnp.zeros((1, 1, H), grads_out.dtype)
    at_f, at_b = 4 * H + 4, 4 * H + 4 + 4 * m
    for k in range(4):
        grads_out[pl.ds(b, 1), pl.ds(k * H, H), :] = dw[k][None]
        grads_out[pl.ds(b, 1), pl.ds(4 * H + k, 1), :] = dpb[k][None]
        for r in range(m):
            jf = rows[0].index(r) if r in rows[0] else None
            jb = rows[1].index(r) if r in rows[1] else None
            grads_out[pl.ds(b, 1), pl.ds(at_f + 4 * r + k, 1), :] = (
                zrow if jf is None else dwf[jf][k][None])
            grads_out[pl.ds(b, 1), pl.ds(at_b + 4 * r + k, 1), :] = (
                zrow if jb is None else (bwd_ref[pl.ds(b, 1), pl.ds(jb, 1)] * dpb[k])[None])
    grads_out[pl.ds(b, 1), pl.ds(at_b + 4 * m, m), :] = (scale * dmsg.T * hsum)[None]
    # d bwd_in[b, rows[1][j]] = sum_k dpb_k . w_b[row, gate k].
    for j, rb in enumerate(rows[1]):
        dbwd_out[pl.ds(b, 1), pl.ds(j, 1)] = sum(
            jnp.sum(dpb[k] * w_b_ref[pl.ds(rb, 1), pl.ds(k * H, H)], axis=1, keepdims=True)
            for k in range(4))


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def cols_body_supported(H: int, m: int, rows) -> bool:
    """Whether the fused GPU body takes these sizes (Triton: powers of two)."""
    return rows_body_supported(H) and _pow2(m) and all(_pow2(len(r)) for r in rows)


def _message_cols(msg, rows):
    """msg [N, m] -> its columns `rows` [N, len(rows)] (static slices)."""
    return jnp.stack([msg[:, r] for r in rows], axis=1)


def _cols_pad(x, Ap):
    A = x.shape[0]
    return jnp.pad(x, ((0, Ap - A),) + ((0, 0),) * (x.ndim - 1)) if Ap > A else x


def _cols_call(cfg, slots, w_h, w_f, w_b, bias, c_fwd, fwd_in, bwd_in, h, c,
               interpret: bool = False):
    """Fused forward on GPU: (h, c) [A, B, H] and the forward message [B, m]."""
    A, B, H = h.shape
    m = c_fwd.shape[1]
    rows = (_rows_of(slots[0], m), _rows_of(slots[1], m))
    Ap = -(-A // GPU_ROWS) * GPU_ROWS
    flat = lambda x: _cols_pad(x.reshape(A, B * H), Ap)
    shapes = ((Ap, B * H), (Ap, B * H), (B, m))
    h2, c2, msg = pl.pallas_call(
        _in_dtype(h.dtype, _cols_fwd_kernel, cfg.micro_ticks, cfg.state_clip,
                  _step_scale(cfg, A), A, rows),
        out_shape=tuple(jax.ShapeDtypeStruct(s, h.dtype) for s in shapes), grid=(B,),
        input_output_aliases=_IN_PLACE, interpret=interpret,
        compiler_params=_triton_params(), name="vsml_layer_step")(
            flat(h), flat(c), w_h, w_f, w_b, bias[None], c_fwd,
            _cols_pad(_message_cols(fwd_in, rows[0]), Ap), _message_cols(bwd_in, rows[1]))
    return h2[:A].reshape(A, B, H), c2[:A].reshape(A, B, H), msg


def _cols_call_bwd(cfg, slots, w_h, w_f, w_b, bias, c_fwd, fwd_in, bwd_in, h, c, dh, dc,
                   dmsg, interpret: bool = False):
    """Fused reverse on GPU: cotangents of (w_h, w_f, w_b, bias, c_fwd, fwd_in, bwd_in,
    h, c)."""
    A, B, H = h.shape
    m, G = c_fwd.shape[1], 4 * H
    rows = (_rows_of(slots[0], m), _rows_of(slots[1], m))
    nf, nb = len(rows[0]), len(rows[1])
    Ap = -(-A // GPU_ROWS) * GPU_ROWS
    flat = lambda x: _cols_pad(x.reshape(A, B * H), Ap)
    packed = 4 * H + 4 + 9 * m
    shapes = ((Ap, B * H), (Ap, B * H), (B, Ap, nf), (B, nb), (B, packed, H))
    dh2, dc2, dfwd, dbwd, grads = pl.pallas_call(
        _in_dtype(h.dtype, _cols_bwd_kernel, cfg.micro_ticks, cfg.state_clip,
                  _step_scale(cfg, A), A, rows),
        out_shape=tuple(jax.ShapeDtypeStruct(s, h.dtype) for s in shapes), grid=(B,),
        input_output_aliases={9: 0, 10: 1}, interpret=interpret,
        compiler_params=_triton_params(), name="vsml_layer_step_bwd")(
            flat(h), flat(c), w_h, w_f, w_b, bias[None], c_fwd,
            _cols_pad(_message_cols(fwd_in, rows[0]), Ap), _message_cols(bwd_in, rows[1]),
            flat(dh), flat(dc), dmsg)
    g = jnp.sum(grads, axis=0)                                          # [packed, H]
    dw_h = g[:4 * H].reshape(4, H, H).transpose(1, 0, 2).reshape(H, G)
    dbias = g[4 * H:4 * H + 4].reshape(G)
    at = 4 * H + 4
    dw_f = g[at:at + 4 * m].reshape(m, G)
    dw_b = g[at + 4 * m:at + 8 * m].reshape(m, G)
    dc_fwd = g[at + 8 * m:].T
    d_fwd_in = _message_cotangent(jnp.sum(dfwd, axis=0)[:A].T, rows[0], m)
    d_bwd_in = _message_cotangent(dbwd.T, rows[1], m)
    return (dw_h, dw_f, dw_b, dbias, dc_fwd, d_fwd_in, d_bwd_in,
            dh2[:A].reshape(A, B, H), dc2[:A].reshape(A, B, H))


# ------------------------------------------------------------ dispatch
def _ticks_any(cfg, w_h, pre_a, pre_b, h, c):
    gpu = (functools.partial(_rows_call, cfg) if rows_body_supported(cfg.hidden_size)
           else functools.partial(grid._ticks, cfg))
    return jax.lax.platform_dependent(
        w_h, pre_a, pre_b, h, c,
        cpu=functools.partial(_wide_call, cfg, interpret=True),
        cuda=gpu, rocm=gpu,
        default=functools.partial(_wide_call, cfg, interpret=False))


def _xla_bwd(cfg, w_h, pre_a, pre_b, h, c, dh, dc):
    return grid._lstm_ticks_bwd(cfg, (w_h, pre_a, pre_b, h, c), (dh, dc))


def _ticks_any_bwd(cfg, w_h, pre_a, pre_b, h, c, dh, dc):
    gpu = functools.partial(_rows_call_bwd if rows_body_supported(cfg.hidden_size)
                            else _xla_bwd, cfg)
    return jax.lax.platform_dependent(
        w_h, pre_a, pre_b, h, c, dh, dc,
        cpu=functools.partial(_wide_call_bwd, cfg, interpret=True),
        cuda=gpu, rocm=gpu,
        default=functools.partial(_wide_call_bwd, cfg, interpret=False))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def lstm_ticks(cfg: VSMLConfig, w_h, pre_a, pre_b, h, c):
    """`grid._lstm_ticks` as one Pallas kernel, its reverse as one more.

    Args: w_h [H, G] (sigmoid-gate columns pre-scaled by 1/2), pre_a [A, G],
    pre_b [B, G] (scaled alike), h, c [A, B, H]. Returns (h, c) after the ticks.
    """
    return _ticks_any(cfg, w_h, pre_a, pre_b, h, c)


def _lstm_ticks_fwd(cfg, w_h, pre_a, pre_b, h, c):
    return _ticks_any(cfg, w_h, pre_a, pre_b, h, c), (w_h, pre_a, pre_b, h, c)


def _lstm_ticks_bwd(cfg, res, cts):
    return _ticks_any_bwd(cfg, *res, *cts)


lstm_ticks.defvjp(_lstm_ticks_fwd, _lstm_ticks_bwd)


def layer_ticks(p: CellParams, cfg: VSMLConfig, s: LayerState, fwd_in: jax.Array,
                bwd_in: jax.Array, layer_index: int,
                fwd_slots: grid.Slots = None, bwd_slots: grid.Slots = None) -> LayerState:
    """`grid.layer_ticks` with the LSTM micro ticks in one Pallas kernel.

    Args:
      s: LayerState with h, c [A, B, H].
      fwd_in: [A, m]; bwd_in: [B, m]; fwd_slots, bwd_slots as in grid.layer_ticks.
    Returns:
      the new LayerState, same shapes. A vanilla cell runs `grid.layer_ticks`
      (and on GPU so does an LSTM whose H the Triton body does not take, see
      `rows_body_supported`).
    """
    if cfg.cell != "lstm":
        return grid.layer_ticks(p, cfg, s, fwd_in, bwd_in, layer_index,
                                fwd_slots=fwd_slots, bwd_slots=bwd_slots)
    w_h, pre_a, pre_b = grid.scaled_preactivations(p, cfg, fwd_in, bwd_in, layer_index,
                                                   fwd_slots, bwd_slots)
    h, c = lstm_ticks(cfg, w_h, pre_a, pre_b, s.h, s.c)
    return LayerState(h=h, c=c)
