"""Population section: ES population evaluation by vmap, lax.map, and lax.map
sharded over CPU devices (results checked against vmap)."""
from __future__ import annotations

from typing import Dict, Sequence

from experiments.benchmark.tools import compile_fn, episode_loss_fn, make_problem, time_calls


def population(sizes, pops: Sequence[int], T: int, device_counts: Sequence[int],
               repeats: int) -> Dict:
    """ES population evaluation: vmap over V_M of one episode's loss.

    Every member runs the same episode (same data and initial state) with its
    own V_M (a random perturbation of one V_M). Besides vmap, the population
    is also run one member after another (lax.map). Sharded runs put the
    population axis on a Mesh of the first n CPU devices and replicate the
    data; their losses are compared with the unsharded ones.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from vsml_jax.meta import sharding
    cfg, params, state, x, y = make_problem(sizes, T, None)
    loss = episode_loss_fn("fast", False)
    single = compile_fn(loss, params, state, x, y)
    t1 = time_calls(single, (params, state, x, y), repeats)
    out = dict(sizes=list(sizes), T=T, single_episode=dict(
        time=t1, episodes_per_s=1.0 / t1["median"]), runs=[])
    pop_loss = jax.vmap(loss, in_axes=(0, None, None, None))
    for P in pops:
        keys = jax.random.split(jax.random.key(7), P)
        pop = jax.vmap(lambda k: jax.tree_util.tree_map(
            lambda a: a + 0.01 * jax.random.normal(k, a.shape, a.dtype), params))(keys)
        f = compile_fn(pop_loss, pop, state, x, y)
        t = time_calls(f, (pop, state, x, y), repeats)
        ref = np.asarray(f(pop, state, x, y))
        out["runs"].append(dict(population=P, devices=1, mode="vmap", time=t,
                                episodes_per_s=P / t["median"],
                                per_episode_over_single=t["median"] / P / t1["median"]))
        # The same population one member after another (lax.map): on a CPU the
        # vmapped grid of all members no longer fits in cache.
        fm = compile_fn(lambda pop, s, x, y: jax.lax.map(lambda q: loss(q, s, x, y), pop),
                        pop, state, x, y)
        tm = time_calls(fm, (pop, state, x, y), repeats)
        got = np.asarray(fm(pop, state, x, y))
        out["runs"].append(dict(population=P, devices=1, mode="lax.map", time=tm,
                                episodes_per_s=P / tm["median"],
                                per_episode_over_single=tm["median"] / P / t1["median"],
                                max_abs_diff_vs_unsharded=float(np.max(np.abs(got - ref))),
                                bitwise_equal=bool(np.array_equal(got, ref)),
                                allclose=bool(np.allclose(got, ref, rtol=1e-5, atol=1e-6))))
        for n in device_counts:
            if n > len(jax.devices()) or P % n:
                continue
            # As meta-training runs it on a CPU: the population axis split over
            # n devices with shard_map, each device mapping over its members.
            mesh = sharding.device_mesh(jax.devices()[:n])
            shard = NamedSharding(mesh, PartitionSpec(sharding.DATA_AXIS))
            repl = NamedSharding(mesh, PartitionSpec())
            pop_s = jax.device_put(pop, shard)
            st_s, x_s, y_s = jax.device_put((state, x, y), repl)
            per_device = lambda pop, s, x, y: jax.lax.map(lambda q: loss(q, s, x, y), pop)
            fs = jax.jit(sharding.shard_population(per_device, mesh)).lower(
                pop_s, st_s, x_s, y_s).compile()
            ts = time_calls(fs, (pop_s, st_s, x_s, y_s), repeats)
            got = np.asarray(fs(pop_s, st_s, x_s, y_s))
            out["runs"].append(dict(
                population=P, devices=n, mode="lax.map, sharded", time=ts,
                episodes_per_s=P / ts["median"],
                per_episode_over_single=ts["median"] / P / t1["median"],
                max_abs_diff_vs_unsharded=float(np.max(np.abs(got - ref))),
                bitwise_equal=bool(np.array_equal(got, ref)),
                allclose=bool(np.allclose(got, ref, rtol=1e-5, atol=1e-6))))
    return out
