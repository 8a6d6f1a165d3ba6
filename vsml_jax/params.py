"""Meta variables V_M: the few parameters shared by every cell of the grid.

For one parameter set (eq. 6 / 14 with message projections):

    w_h    [H, G]   recurrent weights of the cell (W in eq. 3)
    w_f    [m, G]   projection of the incoming forward message
    w_b    [m, G]   projection of the incoming backward message
    bias   [G]      b^ in eq. 3
    c_fwd  [H, m]   forward messenger (C in eq. 3): cell -> next neuron
    u_bwd  [H, m]   backward messenger (U in eq. 14), None if disabled
    w_coord[3, G]   coordinate features (a/A, b/B, layer position), None if disabled

G = 4H for an LSTM (gate order i, f, g, o) and H for a vanilla cell. In the
paper's eq. 3 the interaction enters through C alone; here it enters through
C then w_f, i.e. C @ w_f plays the role of the paper's C (of rank <= m). With
m = N and w_f = I the two coincide exactly (see `sparse_shared`).

When `cfg.tie_layers` is False every leaf has a leading axis [L].
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from vsml_jax.config import VSMLConfig


@struct.dataclass
class CellParams:
    w_h: jax.Array
    w_f: jax.Array
    w_b: jax.Array
    bias: jax.Array
    c_fwd: jax.Array
    u_bwd: Optional[jax.Array] = None
    w_coord: Optional[jax.Array] = None


@struct.dataclass
class VSMLParams:
    """V_M plus the static config that gives it meaning.

    `cfg` is static pytree metadata: `jax.grad`, `jax.vmap` (population of
    params) and `ravel_pytree` see only the arrays in `cells`.
    """
    cells: CellParams
    cfg: VSMLConfig = struct.field(pytree_node=False)

    def layer(self, index: int) -> CellParams:
        """The parameter set used by layer `index` (the shared one if tied)."""
        if self.cfg.tie_layers:
            return self.cells
        return jax.tree_util.tree_map(lambda x: x[index], self.cells)


def _init_cell_params(key: jax.Array, cfg: VSMLConfig) -> CellParams:
    H, m, G = cfg.hidden_size, cfg.msg_size, cfg.gate_size
    dtype = jnp.dtype(cfg.dtype)
    k = jax.random.split(key, 6)
    s = cfg.param_init_scale

    def normal(key, shape, fan_in):
        # A Python float is weakly typed, so the product keeps `dtype` (a NumPy
        # scalar would promote bfloat16/float16 weights to float32).
        # Drawn flat then reshaped: the same numbers, but XLA compiles the 1-D
        # draw several times faster, which dominates short runs and tests.
        flat = jax.random.normal(key, (int(np.prod(shape)),), dtype)
        return float(s / np.sqrt(fan_in)) * flat.reshape(shape)

    bias = jnp.zeros((G,), dtype)
    if cfg.cell == "lstm":
        # A forget-gate bias of 1 keeps the state (the emergent weight) by default.
        bias = bias.at[H:2 * H].set(1.0)
    return CellParams(
        w_h=normal(k[0], (H, G), H),
        w_f=normal(k[1], (m, G), m),
        w_b=normal(k[2], (m, G), m),
        bias=bias,
        c_fwd=normal(k[3], (H, m), H),
        u_bwd=normal(k[4], (H, m), H) if cfg.backward_interaction else None,
        w_coord=normal(k[5], (3, G), 3) if cfg.coordinates else None,
    )


def init_params(key: jax.Array, cfg: VSMLConfig) -> VSMLParams:
    """Random V_M for `cfg` (one set, or one per layer if layers are untied)."""
    if cfg.tie_layers:
        cells = _init_cell_params(key, cfg)
    else:
        keys = jax.random.split(key, cfg.num_layers)
        cells = jax.vmap(lambda k: _init_cell_params(k, cfg))(keys)
    return VSMLParams(cells=cells, cfg=cfg)


def count_meta_variables(cfg: VSMLConfig) -> int:
    """|V_M|: the number of meta-learned numbers for `cfg`."""
    shapes = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))
