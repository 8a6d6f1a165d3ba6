"""Roofline section: the machine's float32 matmul rate and tanh rates, measured
in the same run as the kernels they bound."""
from __future__ import annotations

from typing import Dict

from experiments.benchmark.tools import compile_fn, time_calls


def roofline(repeats: int, quick: bool) -> Dict:
    """Matmul GFLOP/s (2048^2 float32) and tanh rates (G elements/s), on all cores."""
    import jax
    import jax.numpy as jnp
    n = 1024 if quick else 2048
    a = jax.random.normal(jax.random.key(0), (n, n))
    mm = compile_fn(lambda a: a @ a, a)
    t_mm = time_calls(mm, (a,), repeats)
    big = 2**22 if quick else 2**24
    x = jnp.linspace(-3.0, 3.0, big)
    th = compile_fn(jnp.tanh, x)
    t_th = time_calls(th, (x,), repeats)
    # Cache-resident tanh: 64K elements (256 KB) ticked many times in a loop,
    # which is the regime of the kernel (tiles stay in L2).
    small, reps = 2**16, 256
    xs = jnp.linspace(-3.0, 3.0, small)
    loop = compile_fn(lambda x: jax.lax.fori_loop(0, reps, lambda i, v: jnp.tanh(v) * 2.5, x), xs)
    t_loop = time_calls(loop, (xs,), repeats)
    # Rates from the fastest call: the machine's capability, least disturbed
    # by other processes (so the fractions below are conservative).
    return dict(
        matmul=dict(n=n, gflops=2 * n**3 / t_mm["min"] / 1e9, time=t_mm),
        tanh_big=dict(elements=big, gelem_per_s=big / t_th["min"] / 1e9, time=t_th),
        tanh_cache=dict(elements=small, loops=reps,
                        gelem_per_s=small * reps / t_loop["min"] / 1e9, time=t_loop))
