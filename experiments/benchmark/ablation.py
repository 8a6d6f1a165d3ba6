"""Ablation section: the fast kernel's micro tick without tanh, without the
matmul and without tiling, to say which part limits the speed."""
from __future__ import annotations

import functools
from typing import Dict

from experiments.benchmark.tools import compile_fn, make_problem, time_calls


def ablation(sizes, T: int, repeats: int) -> Dict:
    """The fast kernel's micro ticks alone, with parts removed, batch 1.

    Per step the messages' pre-activations are taken from a precomputed random
    sequence, so only `cfg.micro_ticks` ticks of the grid are timed:
      full      the kernel as used by unroll (CPU tiling);
      untiled   the whole grid in one op per pass;
      no_tanh   tanh replaced by a clip to [-1, 1] (2 cheap ops);
      no_matmul h @ W_h replaced by broadcasting h's first unit to the G gates.
    """
    import jax
    import jax.numpy as jnp
    from vsml_jax import grid
    cfg, params, state, _, _ = make_problem(sizes, T, None)
    A, B = sizes
    G = cfg.gate_size
    pre_seq = jax.random.normal(jax.random.key(5), (T, A, G))
    pre_b = jax.random.normal(jax.random.key(6), (B, G))
    w_h = params.cells.w_h
    tiles = grid.num_tiles(A, B)
    clip = lambda v: jnp.clip(v, -1.0, 1.0)
    bcast = lambda h, w: jnp.broadcast_to(h[..., :1], h.shape[:-1] + (w.shape[1],))
    variants = {
        "full": dict(tiles=tiles),
        "untiled": dict(tiles=1),
        "no_tanh": dict(tiles=tiles, act=clip),
        "no_matmul": dict(tiles=tiles, matmul=bcast),
        "no_tanh_no_matmul": dict(tiles=tiles, act=clip, matmul=bcast),
    }
    out = dict(tiles=tiles, T=T)
    for name, v in variants.items():
        v = dict(v)
        n = v.pop("tiles")
        ticks = (functools.partial(grid._tiled_ticks, cfg, n, **v) if n > 1
                 else functools.partial(grid._ticks, cfg, **v))

        def run(w_h, pre_seq, pre_b, h, c, ticks=ticks):
            def body(carry, pre_a):
                return ticks(w_h, pre_a, pre_b, *carry), None
            return jax.lax.scan(body, (h, c), pre_seq)[0]

        f = compile_fn(run, w_h, pre_seq, pre_b, state.layers[0].h, state.layers[0].c)
        t = time_calls(f, (w_h, pre_seq, pre_b, state.layers[0].h, state.layers[0].c), repeats)
        out[name] = dict(time=t, ms_per_step=t["median"] / T * 1e3,
                         cell_ticks_per_s=T * A * B * cfg.micro_ticks / t["median"])
    return out
