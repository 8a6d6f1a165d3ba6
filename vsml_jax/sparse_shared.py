"""Theorem 1: a VS Meta RNN is one ordinary RNN with a sparse, shared matrix.

The paper's eq. 3 updates an A x A grid of small RNNs with state s [A, A, N]
that share V_M = {b^, W, C}:

    s'_abj = act(b^_j + sum_i s_abi W_ij + sum_{c,i} s_cai C_ij)        (eq. 3, left)

Cell (a, b) hears, through C, every cell (c, a) whose *output* neuron is its
own *input* neuron a. Appendix A shows the same update is eq. 1, a single RNN
on the flattened state s [A*A*N], with the matrix

    W~_cdiabj = [d == a] C_ij + [d == b][c == a] W_ij                     (eq. 19)

i.e. the four cases of eq. 4: C where d = a but (c, d) != (a, b), W where
(c, d) = (a, b) but d != a, C + W on the diagonal blocks with a = b = c = d,
and zero everywhere else. Flattening puts (c, d, i) on rows and (a, b, j) on
columns, both in row-major order, so s_flat @ W~ is eq. 3's right side.

`library_vanilla_grid_step` shows that the library's own fast kernel
(`vsml_jax.grid`, vanilla cell, sum reduction, one micro tick) computes
exactly eq. 3, so the theorem applies to the code that is trained.

This module serves the tests and the documentation; it is not on the hot path
(W~ has (A*A*N)^2 entries).
"""
from __future__ import annotations

from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

from vsml_jax import grid
from vsml_jax.config import VSMLConfig
from vsml_jax.params import CellParams
from vsml_jax.state import LayerState

Activation = Callable[[jax.Array], jax.Array]


def vs_meta_rnn_step(b_hat: jax.Array, W: jax.Array, C: jax.Array, s: jax.Array,
                     activation: Activation = jnp.tanh) -> jax.Array:
    """One step of eq. 3 (left side), written literally.

    Args:
      b_hat: [N] bias shared by every cell.
      W: [N, N] recurrent weights shared by every cell (W_ij: from i to j).
      C: [N, N] interaction weights shared by every cell.
      s: [A, A, N] states of the A x A grid of cells (A = B as in the paper).
      activation: the non-linearity sigma.
    Returns:
      s' [A, A, N] with s'_abj = act(b_j + sum_i s_abi W_ij + sum_{c,i} s_cai C_ij).
    """
    _check_square_grid(s, W, C, b_hat)
    own = jnp.einsum("abi,ij->abj", s, W)
    # Message into neuron a: every cell (c, a) that ends in a; broadcast over b.
    interaction = jnp.einsum("cai,ij->aj", s, C)[:, None, :]
    return activation(b_hat + own + interaction)


def sparse_shared_matrix(W: jax.Array, C: jax.Array, A: int) -> jax.Array:
    """W~ of eq. 4 / eq. 19, flattened to [A*A*N, A*A*N].

    Args:
      W, C: [N, N] the shared recurrent and interaction weights.
      A: grid side (the grid is A x A).
    Returns:
      W~ with row index flatten(c, d, i) and column index flatten(a, b, j)
      (row-major), where W~_cdiabj = [d == a] C_ij + [d == b][c == a] W_ij.
    """
    N = W.shape[0]
    if W.shape != (N, N) or C.shape != (N, N):
        raise ValueError(f"sparse_shared_matrix: W {W.shape} and C {C.shape} must both "
                         "be square [N, N] with the same N.")
    if A < 1:
        raise ValueError(f"sparse_shared_matrix: A={A} must be >= 1.")
    eye = jnp.eye(A, dtype=W.dtype)
    # Axes (c, d, i, a, b, j); each indicator is broadcast over the axes it ignores.
    d_eq_a = eye[None, :, None, :, None, None]
    d_eq_b = eye[None, :, None, None, :, None]
    c_eq_a = eye[:, None, None, :, None, None]
    C6 = C[None, None, :, None, None, :]
    W6 = W[None, None, :, None, None, :]
    W_tilde = d_eq_a * C6 + d_eq_b * c_eq_a * W6
    W_tilde = jnp.broadcast_to(W_tilde, (A, A, N, A, A, N))
    return W_tilde.reshape(A * A * N, A * A * N)


def single_rnn_step(b_hat: jax.Array, W_tilde: jax.Array, s_flat: jax.Array,
                    activation: Activation = jnp.tanh) -> jax.Array:
    """One step of eq. 1 with the big matrix: act(b^ + s_flat @ W~).

    Args:
      b_hat: [N] the shared bias; it is tiled over the A*A cells.
      W_tilde: [A*A*N, A*A*N] from `sparse_shared_matrix`.
      s_flat: [A*A*N] the grid state flattened in (a, b, j) row-major order.
    Returns:
      s'_flat [A*A*N].
    """
    size = W_tilde.shape[0]
    N = b_hat.shape[0]
    if W_tilde.shape != (size, size) or s_flat.shape != (size,) or size % N:
        raise ValueError(f"single_rnn_step: W_tilde {W_tilde.shape}, s_flat "
                         f"{s_flat.shape} and b_hat {b_hat.shape} do not fit: expected "
                         "[A*A*N, A*A*N], [A*A*N] and [N].")
    return activation(jnp.tile(b_hat, size // N) + s_flat @ W_tilde)


def block_pattern_counts(A: int) -> Dict[str, int]:
    """How many of the (A*A)^2 N x N blocks of W~ are C, W, C + W and zero.

    From eq. 4 with (c, d) the block row and (a, b) the block column:
    d = a holds for A^3 blocks, (d = b and c = a) for A^2, both for A.
    """
    return {"C": A ** 3 - A, "W": A ** 2 - A, "C+W": A,
            "zero": A ** 4 - A ** 3 - A ** 2 + A}


def sparsity_stats(W_tilde, N: int) -> Dict[str, float]:
    """Sparsity and sharing of a W~ (numpy; meant for small A).

    Args:
      W_tilde: [A*A*N, A*A*N].
      N: the size of one cell's state.
    Returns:
      dict with `fraction_zero` (of all entries), `num_blocks` ((A*A)^2),
      `num_zero_blocks`, `num_nonzero_blocks` and `num_distinct_blocks` (distinct
      non-zero N x N blocks: 3 for generic W, C when A > 1, namely C, W, C + W;
      these are the only free numbers, 2 N^2, however large A is).
    """
    W_tilde = np.asarray(W_tilde)
    size = W_tilde.shape[0]
    cells = size // N
    blocks = W_tilde.reshape(cells, N, cells, N).transpose(0, 2, 1, 3).reshape(-1, N * N)
    nonzero = np.any(blocks != 0, axis=1)
    distinct = np.unique(blocks[nonzero], axis=0).shape[0] if nonzero.any() else 0
    return {
        "fraction_zero": float(np.mean(W_tilde == 0)),
        "num_blocks": int(blocks.shape[0]),
        "num_zero_blocks": int(np.sum(~nonzero)),
        "num_nonzero_blocks": int(np.sum(nonzero)),
        "num_distinct_blocks": int(distinct),
    }


def library_vanilla_grid_step(C: jax.Array, W: jax.Array, b_hat: jax.Array,
                              s: jax.Array) -> jax.Array:
    """Eq. 3 computed by the library's fast kernel (`vsml_jax.grid`).

    The mapping: a single layer with A input and A output neurons
    (layer_sizes=(A, A)), vanilla (tanh) cells with hidden_size = msg_size = N,
    one micro tick, "sum" reduction, no clipping and no backward messages, and

        w_h = W,  w_f = I,  w_b = 0,  bias = b^,  c_fwd = C.

    `grid.forward_messages` gives, for every output neuron, sum_c s_c. @ C
    ([A, N]). Feeding those back as the layer's forward input makes neuron a's
    message sum_{c,i} s_cai C_ij, the interaction term of eq. 3 (the cells
    (c, a) end in neuron a, which is also the input neuron of the cells (a, b)
    because A = B). With w_f = I the kernel's pre-activation is then
    s_ab @ W + msg_a + b^, i.e. eq. 3.

    Args:
      C, W: [N, N]; b_hat: [N]; s: [A, A, N].
    Returns:
      s' [A, A, N], equal to `vs_meta_rnn_step(b_hat, W, C, s)`.
    """
    _check_square_grid(s, W, C, b_hat)
    A, _, N = s.shape
    cfg = VSMLConfig(layer_sizes=(A, A), cell="vanilla", hidden_size=N, msg_size=N,
                     micro_ticks=1, reduce="sum", state_clip=None,
                     backward_interaction=False, dtype=jnp.dtype(s.dtype).name)
    p = CellParams(w_h=W, w_f=jnp.eye(N, dtype=s.dtype),
                   w_b=jnp.zeros((N, N), s.dtype), bias=b_hat, c_fwd=C)
    layer = LayerState(h=s, c=jnp.zeros((A, A, 0), s.dtype))
    fwd_in = grid.forward_messages(p, cfg, layer)  # [A, N]: message into neuron a
    bwd_in = jnp.zeros((A, N), s.dtype)
    return grid.layer_ticks(p, cfg, layer, fwd_in, bwd_in, layer_index=0).h


def _check_square_grid(s, W, C, b_hat) -> None:
    if s.ndim != 3 or s.shape[0] != s.shape[1]:
        raise ValueError(f"state s has shape {s.shape}; eq. 3 needs a square grid "
                         "[A, A, N] (A = B).")
    N = s.shape[2]
    if W.shape != (N, N) or C.shape != (N, N) or b_hat.shape != (N,):
        raise ValueError(f"W {W.shape}, C {C.shape} and b_hat {b_hat.shape} must be "
                         f"[{N}, {N}], [{N}, {N}] and [{N}] for a state of shape "
                         f"{s.shape}.")
