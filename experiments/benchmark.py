r"""Speed and memory of the VS Meta RNN kernels on this machine.

    python -m experiments.benchmark                 # full run, writes benchmark.json
    python -m experiments.benchmark --quick --out=/tmp/b.json --markdown=/tmp/b.md

One process, one go. For the paper's 784 -> 10 LSTM layer (H=16, m=8, 2 micro
ticks) and a reduced 49 -> 10 one it measures:

* roofline: the machine's float32 matmul rate (2048 x 2048) and tanh rate (one
  big jnp.tanh, and tanh on cache-resident data), measured in the same run;
* forward unroll, batch 1 and a batch of 16 episodes (vmap), fast kernel
  (`grid`) and per-cell reference (`reference`): cell micro-ticks per second,
  FLOP rate as a fraction of the matmul rate, and the fraction of the
  physical limit (h @ W_h at the matmul rate + gate tanh at the tanh rate);
* ablations of the fast kernel's micro ticks (no tanh, no matmul, no tiling)
  to say which part limits the speed;
* BPTT meta-gradient step (4 episodes x T, vmap, grad of the mean loss):
  time, gradient / forward time ratio, fast vs reference;
* BPTT memory for T = 100, 500, 2000 with and without rematerialisation,
  from `jit(...).lower(...).compile().memory_analysis()` (no run needed);
* ES population evaluation, populations 16 and 64: vmap over the population,
  lax.map (one member after another, what meta-training uses on a CPU), and
  lax.map sharded over 2 and 8 CPU devices (shard_map over a Mesh, population
  axis sharded, data replicated), checking that results equal the vmap ones;
* scaling (`--sections=scaling`, not part of the default run): meta-training
  steps/s of the real training step (`gradient.make_step_fn` / BPTT with Adam,
  `evolution.make_step_fn` / OpenAI-ES) on 1, 2, 4, 8 CPU devices of one
  process and on 2 processes x 2 devices (jax.distributed on 127.0.0.1, gloo),
  each configuration in a fresh worker process (`--scaling_worker`), with the
  speed-up and efficiency per device against 1 device.

Timings exclude compilation and a warm-up call; each is the median of
`--repeats` calls, with min and max. FLOPs are counted per cell micro-tick of
an LSTM: 2*H*4H for h @ W_h, 4H for adding the message pre-activations and
12H for the gate arithmetic (sigmoid via tanh: (t+1)/2 per gate, c and h
updates, clip); transcendentals (4H gate tanh + H tanh(c)) are counted
separately. Per-neuron work (messages, read-out), O(A + B) per step, is not
counted. Other processes on the machine make timings noisy: the load average
is recorded before and after.
"""
from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import resource
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

from absl import app, flags

flags.DEFINE_string("out", "benchmark.json", "Where the JSON results are written.")
flags.DEFINE_string("markdown", None, "Also write the results tables as markdown here.")
flags.DEFINE_bool("quick", False, "Small and fast run (short episodes, 1-2 repeats): a smoke "
                  "test of the benchmark, not numbers to quote.")
flags.DEFINE_integer("repeats", None, "Timed calls per measurement (default 5, quick 2).")
flags.DEFINE_list("sections", ["roofline", "forward", "ablation", "bptt", "memory",
                               "population"], "Which parts to run (also: scaling, "
                  "which starts worker processes and is not run by default).")
flags.DEFINE_string("scaling_worker", None, "Internal: run one scaling measurement "
                    "described by this JSON and print its result (used by "
                    "--sections=scaling, which starts these workers).")
FLAGS = flags.FLAGS

PAPER = (784, 10)
REDUCED = (49, 10)
NUM_CPU_DEVICES = 8
SECTIONS = ("roofline", "forward", "ablation", "bptt", "memory", "population", "scaling")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ helpers
def _block(x):
    import jax
    return jax.block_until_ready(x)


def time_calls(fn: Callable, args: Sequence, repeats: int) -> Dict[str, float]:
    """Median / min / max wall seconds of `fn(*args)` over `repeats` calls.

    `fn` should be compiled already; one warm-up call is made and not timed.
    Also returns the median process CPU seconds per call (all threads).
    """
    _block(fn(*args))
    walls, cpus = [], []
    for _ in range(repeats):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        _block(fn(*args))
        walls.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpus.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    return dict(median=statistics.median(walls), min=min(walls), max=max(walls),
                cpu_median=statistics.median(cpus), repeats=repeats)


def compile_fn(fn: Callable, *args):
    import jax
    return jax.jit(fn).lower(*args).compile()


def memory_of(compiled) -> Dict[str, float]:
    """Temp / argument / output bytes of a compiled function, in MiB."""
    m = compiled.memory_analysis()
    temp, arg, out = (m.temp_size_in_bytes / 2**20, m.argument_size_in_bytes / 2**20,
                      m.output_size_in_bytes / 2**20)
    return dict(temp_mib=temp, argument_mib=arg, output_mib=out, total_mib=temp + arg + out)


def lstm_work_per_cell_tick(H: int) -> Dict[str, int]:
    """FLOPs and transcendentals of one LSTM cell micro-tick (see module doc)."""
    G = 4 * H
    return dict(matmul_flops=2 * H * G, elementwise_flops=G + 12 * H,
                transcendentals=G + H)


def machine_info() -> Dict:
    import jax
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                jax_version=jax.__version__, cpu_model=cpu, cpu_count=os.cpu_count(),
                python=platform.python_version(), backend=jax.default_backend(),
                devices=len(jax.devices()), loadavg_start=list(os.getloadavg()))


# ----------------------------------------------------------------- problems
def make_problem(sizes, T: int, batch: Optional[int], seed: int = 0):
    """(cfg, params, state(s), inputs, labels) for random data.

    batch None: one episode (state leaves [A, B, H], inputs [T, A0]);
    otherwise leading [batch] axes on state and data.
    """
    import jax
    import jax.numpy as jnp
    import vsml_jax
    cfg = vsml_jax.VSMLConfig(layer_sizes=sizes, hidden_size=16, msg_size=8, micro_ticks=2)
    k = jax.random.split(jax.random.key(seed), 4)
    params = vsml_jax.init_params(k[0], cfg)
    lead = () if batch is None else (batch,)
    state = (vsml_jax.init_state(k[1], cfg) if batch is None
             else vsml_jax.init_states(k[1], cfg, batch))
    x = jax.random.normal(k[2], lead + (T, sizes[0]))
    y = jax.nn.one_hot(jax.random.randint(k[3], lead + (T,), 0, sizes[-1]), sizes[-1])
    return cfg, params, state, x, y


def episode_loss_fn(impl: str, batched: bool, **unroll_kwargs):
    """loss(params, state, x, y): mean online CE (averaged over a vmapped batch)."""
    import jax
    import jax.numpy as jnp
    import vsml_jax

    def one(params, state, x, y):
        return vsml_jax.meta_loss(params, state, (x, y), impl=impl, **unroll_kwargs)

    if not batched:
        return one
    return lambda p, s, x, y: jnp.mean(jax.vmap(one, in_axes=(None, 0, 0, 0))(p, s, x, y))


# ----------------------------------------------------------------- sections
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


def forward(sizes, batch: Optional[int], impl: str, T: int, repeats: int,
            roof: Optional[Dict]) -> Dict:
    """Forward unroll speed of one config / batch / impl."""
    cfg, params, state, x, y = make_problem(sizes, T, batch)
    f = compile_fn(episode_loss_fn(impl, batch is not None), params, state, x, y)
    t = time_calls(f, (params, state, x, y), repeats)
    B = batch or 1
    cells = sizes[0] * sizes[1]
    ticks = B * T * cells * cfg.micro_ticks
    work = lstm_work_per_cell_tick(cfg.hidden_size)
    sec = t["median"]
    res = dict(sizes=list(sizes), batch=B, impl=impl, T=T, time=t,
               steps_per_s=B * T / sec, cell_ticks_per_s=ticks / sec)
    flops = ticks * (work["matmul_flops"] + work["elementwise_flops"])
    res["gflops"] = flops / sec / 1e9
    if roof:
        mm_rate = roof["matmul"]["gflops"] * 1e9
        tanh_rate = roof["tanh_big"]["gelem_per_s"] * 1e9
        tanh_cache = roof["tanh_cache"]["gelem_per_s"] * 1e9
        res["fraction_of_matmul_rate"] = flops / sec / mm_rate
        # Physical limit: the matmul at the machine's matmul rate plus the
        # transcendentals at its tanh rate (the cache-resident one, the
        # faster and so the stricter bound).
        limit = ticks * (work["matmul_flops"] / mm_rate
                         + work["transcendentals"] / max(tanh_rate, tanh_cache))
        res["limit_time"] = limit
        res["fraction_of_limit"] = limit / sec
    return res


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


def bptt(sizes, impl: str, T: int, episodes: int, remat: bool, remat_chunk: Optional[int],
         repeats: int, max_mib: Optional[float] = None) -> Dict:
    """One meta-gradient step: grad of the mean loss of `episodes` vmapped episodes.

    With `max_mib`, a setting whose compiled memory exceeds it is not run
    (its memory is still reported).
    """
    import jax
    cfg, params, state, x, y = make_problem(sizes, T, episodes)
    kw = dict(remat=remat, remat_chunk=remat_chunk)
    loss = episode_loss_fn(impl, True, **kw)
    grad = compile_fn(jax.value_and_grad(loss), params, state, x, y)
    out = dict(sizes=list(sizes), impl=impl, T=T, episodes=episodes, remat=remat,
               remat_chunk=remat_chunk, memory=memory_of(grad))
    if max_mib is not None and out["memory"]["total_mib"] > max_mib:
        out["skipped"] = f"compiled memory above {max_mib:.0f} MiB"
        return out
    fwd = compile_fn(loss, params, state, x, y)
    tf = time_calls(fwd, (params, state, x, y), repeats)
    tg = time_calls(grad, (params, state, x, y), repeats)
    out.update(forward_time=tf, grad_time=tg, grad_over_forward=tg["median"] / tf["median"],
               steps_per_s=1.0 / tg["median"])
    return out


def _chunk_for(T: int) -> int:
    """The divisor of T closest to sqrt(T) (the two-level remat chunk)."""
    return _divisor_near(T, math.sqrt(T))


def _nested_chunks_for(T: int) -> List[int]:
    """Two nested remat chunks (k1, k2), each near the cube root of T."""
    k1 = _divisor_near(T, T ** (1 / 3))
    return [k1, _divisor_near(T // k1, math.sqrt(T // k1))]


def _divisor_near(n: int, target: float) -> int:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return min(divs, key=lambda d: abs(math.log(d / target)))


def bptt_memory(sizes, impl: str, Ts: Sequence[int], episodes: int) -> List[Dict]:
    """Compiled memory of the meta-gradient for several T: remat off, per step,
    chunks of ~sqrt(T) steps, and two nested chunk levels of ~T^(1/3)."""
    import jax
    out = []
    for T in Ts:
        cfg, params, state, x, y = make_problem(sizes, T, episodes)
        for remat, chunk in [(False, None), (True, None), (True, _chunk_for(T)),
                             (True, _nested_chunks_for(T))]:
            loss = episode_loss_fn(impl, True, remat=remat,
                                   remat_chunk=tuple(chunk) if isinstance(chunk, list) else chunk)
            grad = compile_fn(jax.value_and_grad(loss), params, state, x, y)
            out.append(dict(sizes=list(sizes), impl=impl, T=T, episodes=episodes,
                            remat=remat, remat_chunk=chunk, **memory_of(grad)))
    return out


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


# ------------------------------------------------------------------ scaling
# The problems of the scaling section: MetaTrainConfig fields. Synthetic data of
# MNIST's pool=4 size (49 inputs, 10 classes) so that no files are needed.
SCALING_COMMON = dict(dataset="synthetic", pool=4, synthetic_size=1000, hidden_size=16,
                      msg_size=8, micro_ticks=1)
SCALING_PROBLEMS = {
    "bptt": dict(SCALING_COMMON, meta_optimizer="adam", episode_length=50, batch_size=16),
    "es": dict(SCALING_COMMON, meta_optimizer="open_es", popsize=64, episode_length=20,
               batch_size=2),
}
SCALING_QUICK_COMMON = dict(dataset="synthetic", pool=4, synthetic_size=64, hidden_size=2,
                            msg_size=2, micro_ticks=1)
SCALING_QUICK_PROBLEMS = {
    "bptt": dict(SCALING_QUICK_COMMON, meta_optimizer="adam", episode_length=5,
                 batch_size=4),
    "es": dict(SCALING_QUICK_COMMON, meta_optimizer="open_es", popsize=8, episode_length=5,
               batch_size=2),
}
SCALING_RESULT_TAG = "SCALING_RESULT "


def scaling_worker(spec: Dict) -> Dict:
    """One scaling configuration, in this (fresh) process: call before any JAX use.

    `spec`: problems {name: MetaTrainConfig fields}, steps (K per timed round),
    rounds, and cluster (Cluster fields, or None for one process). The device
    count comes from the environment (JAX_NUM_CPU_DEVICES), fixed at start-up.
    Every problem's step is built as meta-training builds it (library
    `make_step_fn` on `sharding.device_mesh()`, state from
    `jit(init_fn, out_shardings=replicated(mesh))`), compiled by a first call,
    then `rounds` x K steps are timed (blocking on the state after each round).
    """
    from vsml_jax import runtime
    cluster = spec.get("cluster")
    runtime.start(runtime.Cluster(**cluster) if cluster else None)
    import jax
    from vsml_jax.meta import evolution, gradient, sharding
    from vsml_jax.meta.objective import EpisodeSpec
    from vsml_jax.runs import meta_train as mt

    mesh = sharding.device_mesh()
    out = dict(process_id=jax.process_index(), processes=jax.process_count(),
               devices=int(mesh.devices.size), local_devices=jax.local_device_count(),
               runs={})
    for name, fields in spec["problems"].items():
        cfg = mt.MetaTrainConfig(**fields)
        data = mt.load_train_data(cfg)
        learner = mt.build_learner(cfg, data.input_dim, data.num_classes, train=True)
        ep = EpisodeSpec(length=cfg.episode_length, batch=cfg.batch_size)
        if cfg.gradient_based:
            opt = gradient.make_optimizer(cfg.meta_optimizer, cfg.lr, cfg.clip_norm or None)
            init_fn = gradient.make_init_fn(learner, opt, cfg.seed)
            step_fn = gradient.make_step_fn(learner, opt, data, ep, mesh)
        else:
            strategy, es_params = evolution.make_strategy(
                cfg.meta_optimizer, cfg.popsize, learner.init_params(jax.random.PRNGKey(0)),
                cfg.sigma_init, cfg.es_lr)
            init_fn = evolution.make_init_fn(learner, strategy, es_params, cfg.seed)
            step_fn = evolution.make_step_fn(learner, strategy, es_params, data, ep, mesh,
                                             "auto")
        state = jax.jit(init_fn, out_shardings=sharding.replicated(mesh))()
        _block(state)
        runtime.sync(f"scaling-{name}-compile")
        t0 = time.perf_counter()
        state, metrics = step_fn(state)  # compiles
        _block(state)
        first = time.perf_counter() - t0
        walls, cpus, busy = [], [], 0.0
        for r in range(spec["rounds"]):
            runtime.sync(f"scaling-{name}-{r}")
            r0, b0 = resource.getrusage(resource.RUSAGE_SELF), machine_busy_seconds()
            t0 = time.perf_counter()
            for _ in range(spec["steps"]):
                state, metrics = step_fn(state)
            _block(state)
            walls.append((time.perf_counter() - t0) / spec["steps"])
            r1, b1 = resource.getrusage(resource.RUSAGE_SELF), machine_busy_seconds()
            cpus.append((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
                        / spec["steps"])
            busy += b1 - b0
        loss = float(runtime.to_host(metrics["loss"]))
        out["runs"][name] = dict(
            step_time=dict(median=statistics.median(walls), min=min(walls), max=max(walls),
                           rounds=len(walls), steps_per_round=spec["steps"]),
            cpu_s_per_step=statistics.median(cpus), first_call_s=first,
            steps_done=int(runtime.to_host(state.step)), final_loss=loss,
            timed_wall_s=sum(walls) * spec["steps"], timed_cpu_s=sum(cpus) * spec["steps"],
            timed_machine_busy_s=busy)
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used since boot (/proc/stat).

    NaN where /proc/stat is missing. The difference over a window, minus the
    benchmark's own CPU time, is what other work on the machine used.
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def other_load(seconds: float = 1.0) -> float:
    """Cores' worth of CPU that other processes use, sampled over `seconds`."""
    b0, t0 = machine_busy_seconds(), time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(seconds)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    own = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    return max(0.0, (machine_busy_seconds() - b0 - own) / (time.perf_counter() - t0))


def wait_for_quiet(max_load: float = 0.3, max_wait_s: float = 60.0) -> float:
    """Waits (at most `max_wait_s`) until other processes use < `max_load` cores.

    Returns the last sampled load (cores).
    """
    deadline = time.time() + max_wait_s
    load = other_load()
    while load >= max_load and time.time() < deadline:
        time.sleep(4.0)
        load = other_load()
    return load


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_scaling_workers(spec: Dict, processes: int, devices: int,
                          fast_compile: bool = False):
    """Starts `processes` workers with `devices` CPU devices each (not waiting).

    Several processes form one jax.distributed job on 127.0.0.1 (gloo), as
    tests/test_multiprocess.py starts meta-training. `fast_compile` turns
    XLA's optimisations off (JAX_DISABLE_MOST_OPTIMIZATIONS): quicker start,
    slower steps, for smoke tests only. Returns what `finish_scaling_workers`
    takes.
    """
    import subprocess
    import sys
    import tempfile
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
    env.pop("XLA_FLAGS", None)  # a host device count there would override ours
    if fast_compile:
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    port = _free_port()
    procs, logs = [], []
    for i in range(processes):
        s = dict(spec, cluster=None if processes == 1 else dict(
            coordinator_address=f"127.0.0.1:{port}", num_processes=processes,
            process_id=i, heartbeat_timeout_s=30))
        log = tempfile.TemporaryFile(mode="w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "experiments.benchmark",
             "--scaling_worker=" + json.dumps(s)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return dict(processes=processes, devices=devices, procs=procs, logs=logs,
                started=time.time())


def finish_scaling_workers(job: Dict, timeout: float = 900) -> List[Dict]:
    """Waits for the workers of `job`; their results (process 0 first).

    Raises RuntimeError with the workers' output if one fails or does not
    finish within `timeout` s of its start (then all of them are killed).
    """
    import subprocess
    procs = job["procs"]
    deadline = job["started"] + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    job["wall_s"] = time.time() - job["started"]
    texts = []
    for log in job["logs"]:
        log.seek(0)
        texts.append(log.read())
        log.close()
    results = []
    for text in texts:
        lines = [l for l in text.splitlines() if l.startswith(SCALING_RESULT_TAG)]
        results.append(json.loads(lines[-1][len(SCALING_RESULT_TAG):]) if lines else None)
    if codes != [0] * len(procs) or None in results:
        tails = "\n---\n".join(t[-3000:] for t in texts)
        raise RuntimeError(f"scaling worker(s) {job['processes']} x {job['devices']} "
                           f"devices failed (exit codes {codes}):\n{tails}")
    return results


def scaling(quick: bool, repeats: int, configs: Optional[Sequence] = None,
            problems: Optional[Sequence[str]] = None) -> Dict:
    """Meta-training steps/s against the number of devices and processes.

    `configs`: (processes, devices per process) pairs; default 1 x 1, 2, 4, 8
    and 2 x 2 (quick: 1 x 1, 2 and 2 x 1). `problems`: names in
    SCALING_PROBLEMS (default all). Each configuration runs in fresh
    processes, one configuration after another; with `quick` (a smoke test,
    not numbers to quote) they all run at once, with XLA optimisations off.
    The baseline is the 1-device configuration: speed-up = steps/s / its
    steps/s, efficiency per device = speed-up / devices.
    """
    table = SCALING_QUICK_PROBLEMS if quick else SCALING_PROBLEMS
    problems = {k: table[k] for k in (problems or table)}
    if configs is None:
        configs = ([(1, 1), (1, 2), (2, 1)] if quick
                   else [(1, 1), (1, 2), (1, 4), (1, 8), (2, 2)])
    spec = dict(problems=problems, steps=2 if quick else 5,
                rounds=1 if quick else max(1, min(repeats, 3)))
    out = dict(problems=problems, steps_per_round=spec["steps"], rounds=spec["rounds"],
               cpu_count=os.cpu_count(), concurrent=quick, fast_compile=quick, runs=[])
    if quick:  # all at once: only checks that everything runs
        jobs = [start_scaling_workers(spec, p, d, fast_compile=True) for p, d in configs]
        try:
            done = [(job, finish_scaling_workers(job)) for job in jobs]
        finally:  # a failed job must not leave the others running
            for job in jobs:
                for proc in job["procs"]:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
    else:
        done = []
        for p, d in configs:
            load = wait_for_quiet()  # other people's jobs share the cores
            job = start_scaling_workers(spec, p, d)
            job["other_load_before"] = load
            done.append((job, finish_scaling_workers(job)))
    for job, res in done:
        for name in problems:
            p0 = res[0]["runs"][name]  # process 0 (all processes step in lockstep)
            out["runs"].append(dict(
                problem=name, processes=job["processes"],
                devices_per_process=job["devices"], devices=res[0]["devices"],
                step_time=p0["step_time"], steps_per_s=1.0 / p0["step_time"]["median"],
                cpu_s_per_step=sum(r["runs"][name]["cpu_s_per_step"] for r in res),
                first_call_s=max(r["runs"][name]["first_call_s"] for r in res),
                final_loss=p0["final_loss"], steps_done=p0["steps_done"],
                worker_wall_s=job["wall_s"], other_load_before=job.get("other_load_before"),
                # Cores used by other processes while process 0 timed its rounds.
                other_load=max(0.0, (p0["timed_machine_busy_s"]
                                     - sum(r["runs"][name]["timed_cpu_s"] for r in res))
                               / p0["timed_wall_s"])))
        print(f"scaling {job['processes']} x {job['devices']}: " + ", ".join(
            f"{r['problem']} {r['steps_per_s']:.3f} steps/s"
            for r in out["runs"][-len(problems):]), flush=True)
    order = list(problems)
    out["runs"].sort(key=lambda r: order.index(r["problem"]))  # stable: configs in order
    for name in problems:
        rows = [r for r in out["runs"] if r["problem"] == name]
        base = [r for r in rows if r["devices"] == 1]
        for r in rows:
            if base:
                r["speedup"] = r["steps_per_s"] / base[0]["steps_per_s"]
                r["efficiency_per_device"] = r["speedup"] / r["devices"]
    return out


def _scaling_label(name: str, p: Dict) -> str:
    if name == "bptt":
        return (f"BPTT, {p['meta_optimizer']}, {p['batch_size']} episodes x "
                f"{p['episode_length']}")
    return (f"ES, {p['meta_optimizer']}, population {p['popsize']}, {p['batch_size']} "
            f"episodes x {p['episode_length']}")


def scaling_markdown(sc: Dict) -> List[str]:
    """The scaling table and its note."""
    p0 = next(iter(sc["problems"].values()))
    inputs = (28 // p0["pool"]) ** 2
    lines = [f"| scaling: meta-training step, {inputs}->10, H={p0['hidden_size']}, "
             f"m={p0['msg_size']}, {p0['micro_ticks']} micro tick | processes x devices | "
             "devices | step time | steps/s | speed-up vs 1 device | efficiency per device "
             "| CPU s / step (all processes) | other load (cores) |", "|---" * 9 + "|"]
    last = None
    for r in sc["runs"]:
        label = "" if r["problem"] == last else _scaling_label(r["problem"],
                                                               sc["problems"][r["problem"]])
        last = r["problem"]
        lines.append(
            f"| {label} | {r['processes']} x {r['devices_per_process']} | {r['devices']} | "
            f"{_fmt_t(r['step_time'])} | {r['steps_per_s']:.2f} | "
            f"{r.get('speedup', float('nan')):.2f}x | "
            f"{100 * r.get('efficiency_per_device', float('nan')):.0f}% | "
            f"{r['cpu_s_per_step']:.3f} | {r.get('other_load', float('nan')):.2f} |")
    cores = sc["cpu_count"]
    how = ("all configurations at once, XLA optimisations off (--quick: a smoke test)"
           if sc.get("concurrent") else "one configuration after another")
    lines += ["", f"Each configuration runs in fresh processes (the device count is fixed "
              f"when JAX starts), {how}; {sc['rounds']} rounds of {sc['steps_per_round']} "
              "steps after a compiling first step, step time = median round time / steps. Efficiency per "
              "device = steps/s on n devices / (n x steps/s on 1 device). The devices are "
              f"virtual CPU devices on a {cores}-core machine (`os.cpu_count()` = {cores}): "
              f"only {cores} devices add compute; more devices split the same {cores} cores, "
              f"so the rows above {cores} devices measure sharding and collective overhead, "
              "not scaling. CPU s / step: process CPU time of all the job's processes per step "
              "(up to the core count x step time when every core works). Other load: cores' "
              "worth of CPU that other processes on the machine used while the steps were "
              "timed (from /proc/stat)" + ("." if sc.get("concurrent") else
                                            "; each configuration waits (up to 60 s) for it "
                                            "to drop below 0.3 cores before it starts."), ""]
    return lines


# ------------------------------------------------------------------ report
def _remat_label(row) -> str:
    """How a BPTT row rematerialised: "chunk k", "step" or "off"."""
    chunk = row["remat_chunk"]
    if isinstance(chunk, (list, tuple)):
        return "nested chunks " + " x ".join(map(str, chunk))
    if chunk:
        return "chunk %d" % chunk
    return "step" if row["remat"] else "off"


def _bptt_row_head(b: Dict) -> str:
    """The "| sizes | impl | episodes x T | remat |" cells of a BPTT table row."""
    return (f"| {b['sizes'][0]}->{b['sizes'][1]} | {b['impl']} | {b['episodes']} x {b['T']} "
            f"| {_remat_label(b)} |")


def _fmt_t(t: Dict) -> str:
    return f"{t['median']:.3f} [{t['min']:.3f}, {t['max']:.3f}]"


def to_markdown(r: Dict) -> str:
    """The results as markdown tables (what README / BENCHMARK.md quote)."""
    m = r["machine"]
    # The scaling section's devices are its workers' (in its table), not this process's.
    in_process = any(k in r for k in SECTIONS if k != "scaling")
    devices = f", {m['devices']} virtual CPU devices" if in_process else ""
    lines = [f"Measured {m['date']} with jax {m['jax_version']} on {m['cpu_model']} "
             f"({m['cpu_count']} cores{devices}); load average "
             f"{m['loadavg_start'][0]:.1f} at start, {m.get('loadavg_end', [float('nan')])[0]:.1f}"
             f" at end{' (--quick: not numbers to quote)' if r['quick'] else ''}. Times in s: "
             "median [min, max].", ""]
    if "roofline" in r:
        ro = r["roofline"]
        lines += ["| roofline | rate |", "|---|---|",
                  f"| matmul {ro['matmul']['n']}^2 float32 | {ro['matmul']['gflops']:.1f} GFLOP/s |",
                  f"| tanh, {ro['tanh_big']['elements']} elements | "
                  f"{ro['tanh_big']['gelem_per_s']:.2f} G/s |",
                  f"| tanh, cache-resident ({ro['tanh_cache']['elements']} x "
                  f"{ro['tanh_cache']['loops']}) | {ro['tanh_cache']['gelem_per_s']:.2f} G/s |", ""]
    if "forward" in r:
        lines += ["| forward unroll | impl | batch | T | time | steps/s | cell-ticks/s | "
                  "GFLOP/s | of matmul rate | of limit | speed-up |", "|---" * 11 + "|"]
        for f in r["forward"]:
            lines.append(
                f"| {f['sizes'][0]}->{f['sizes'][1]} | {f['impl']} | {f['batch']} | {f['T']} | "
                f"{_fmt_t(f['time'])} | {f['steps_per_s']:.0f} | {f['cell_ticks_per_s']/1e6:.2f} M | "
                f"{f['gflops']:.1f} | {100*f.get('fraction_of_matmul_rate', float('nan')):.1f}% | "
                f"{100*f.get('fraction_of_limit', float('nan')):.0f}% | "
                f"{f.get('speedup_vs_reference', float('nan')):.2f}x |")
        lines.append("")
    if "ablation" in r:
        a = r["ablation"]
        lines += [f"| micro ticks only, 784->10, batch 1 ({a['tiles']} tiles) | ms/step | "
                  "cell-ticks/s |", "|---|---|---|"]
        for k in ("full", "untiled", "no_tanh", "no_matmul", "no_tanh_no_matmul"):
            lines.append(f"| {k} | {a[k]['ms_per_step']:.3f} | "
                         f"{a[k]['cell_ticks_per_s']/1e6:.2f} M |")
        lines.append("")
    if "bptt" in r:
        lines += ["| BPTT meta-gradient | impl | episodes x T | remat | grad time | "
                  "forward time | grad/forward | steps/s | memory (MiB) |", "|---" * 9 + "|"]
        for b in r["bptt"]:
            if "skipped" in b:
                lines.append(f"{_bptt_row_head(b)} not run: {b['skipped']} | | | | "
                             f"{b['memory']['total_mib']:.0f} |")
                continue
            lines.append(
                f"{_bptt_row_head(b)} {_fmt_t(b['grad_time'])} | {_fmt_t(b['forward_time'])} | "
                f"{b['grad_over_forward']:.2f} | {b['steps_per_s']:.3f} | "
                f"{b['memory']['total_mib']:.0f} |")
        lines.append("")
    if "memory" in r:
        lines += ["| BPTT memory (compiled, MiB) | impl | episodes x T | remat | temp | "
                  "total |", "|---" * 6 + "|"]
        for b in r["memory"]:
            lines.append(f"{_bptt_row_head(b)} {b['temp_mib']:.0f} | {b['total_mib']:.0f} |")
        lines.append("")
    if "population" in r:
        lines += ["| ES population | population | devices | how | time | episodes/s | "
                  "per-episode cost / single episode | equal to vmap, 1 device |",
                  "|---" * 8 + "|"]
        for p in r["population"]:
            s = p["single_episode"]
            lines.append(f"| {p['sizes'][0]}->{p['sizes'][1]}, T={p['T']} | 1 | 1 | no vmap | "
                         f"{_fmt_t(s['time'])} | {s['episodes_per_s']:.2f} | 1.00 | |")
            for q in p["runs"]:
                eq = "" if "bitwise_equal" not in q else (
                    "bitwise" if q["bitwise_equal"] else
                    f"{'allclose' if q['allclose'] else 'NO'} (max diff "
                    f"{q['max_abs_diff_vs_unsharded']:.1e})")
                lines.append(f"| | {q['population']} | {q['devices']} | {q.get('mode', '')} | "
                             f"{_fmt_t(q['time'])} | "
                             f"{q['episodes_per_s']:.2f} | {q['per_episode_over_single']:.2f} | "
                             f"{eq} |")
        lines.append("")
    if "scaling" in r:
        lines += scaling_markdown(r["scaling"])
    if r.get("targets"):
        lines += ["| target | measured | met |", "|---|---|---|"]
        for t in r["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


def check_targets(r: Dict) -> List[Dict]:
    """The product targets, evaluated on this run's numbers."""
    out = []

    def add(target, measured, met):
        out.append(dict(target=target, measured=measured, met=bool(met)))

    fw = {(tuple(f["sizes"]), f["impl"], f["batch"]): f for f in r.get("forward", [])}
    fast, ref = fw.get((PAPER, "fast", 1)), fw.get((PAPER, "reference", 1))
    if fast and ref:
        s = fast["cell_ticks_per_s"] / ref["cell_ticks_per_s"]
        add("forward 784->10 batch 1: >= 4x the reference's cell-ticks/s",
            f"{s:.2f}x ({fast['cell_ticks_per_s']/1e6:.1f} M/s vs "
            f"{ref['cell_ticks_per_s']/1e6:.1f} M/s)", s >= 4)
    bp = {(b["impl"], b["remat"], b["remat_chunk"]): b for b in r.get("bptt", [])
          if "skipped" not in b}
    head = bp.get(("fast", False, None))  # custom VJP, no remat: the default setting
    if head:
        add("BPTT grad/forward time ratio <= 3.5 (fast, no remat)",
            f"{head['grad_over_forward']:.2f}", head["grad_over_forward"] <= 3.5)
        add("BPTT memory 4 x T=100, 784->10 <= 1 GB (fast, no remat)",
            f"{head['memory']['total_mib']:.0f} MiB", head["memory"]["total_mib"] <= 1024)
    for ref_key, name in [(("reference", False, None), "no remat"),
                          (("reference", True, None), "remat per step")]:
        ref_b = bp.get(ref_key)
        if head and ref_b:
            s = ref_b["grad_time"]["median"] / head["grad_time"]["median"]
            add(f"BPTT meta-gradient steps/s >= 5x the reference's (reference {name})",
                f"{s:.2f}x", s >= 5)
    memory = r.get("memory", [])
    base = [m for m in memory if not m["remat"]]
    for label, rows in [("remat_chunk ~ sqrt(T)", [m for m in memory
                                                    if isinstance(m["remat_chunk"], int)]),
                        ("two nested chunks ~ T^(1/3)", [m for m in memory if isinstance(
                            m["remat_chunk"], (list, tuple))])]:
        if len(rows) < 2 or not base:
            continue
        lo, hi = min(rows, key=lambda m: m["T"]), max(rows, key=lambda m: m["T"])
        b0 = min(base, key=lambda m: m["T"])
        ratio = hi["total_mib"] / b0["total_mib"]
        add(f"BPTT memory with remat ({label}) at T={hi['T']} <= 3x the memory at "
            f"T={b0['T']} (no remat)",
            f"{ratio:.2f}x ({hi['total_mib']:.0f} vs {b0['total_mib']:.0f} MiB)", ratio <= 3)
        ratio = hi["total_mib"] / lo["total_mib"]
        add(f"BPTT memory with remat at T={hi['T']} <= 3x that at T={lo['T']} (both "
            f"{label})",
            f"{ratio:.2f}x ({hi['total_mib']:.0f} vs {lo['total_mib']:.0f} MiB)", ratio <= 3)
    for p in r.get("population", []):
        if tuple(p["sizes"]) != PAPER:
            continue
        for q in p["runs"]:
            if q["population"] == 64 and q["devices"] == 1:
                add(f"population 64 ({q.get('mode')}): per-episode cost <= a single "
                    "episode's (784->10)",
                    f"{q['per_episode_over_single']:.2f}", q["per_episode_over_single"] <= 1)
    return out


# -------------------------------------------------------------------- main
def run(quick: bool, repeats: int, sections: Sequence[str]) -> Dict:
    r: Dict = dict(quick=quick, machine=machine_info())
    T_fwd = 20 if quick else 100
    T_bptt = 20 if quick else 100
    mem_Ts = (20, 80, 320) if quick else (100, 500, 2000)
    T_pop = 20 if quick else 100
    pops = (4, 16) if quick else (16, 64)
    if "roofline" in sections or "forward" in sections:
        r["roofline"] = roofline(repeats, quick)
        print("roofline", json.dumps({k: round(v.get("gflops", v.get("gelem_per_s", 0)), 3)
                                       for k, v in r["roofline"].items()}), flush=True)
    if "forward" in sections:
        r["forward"] = []
        for sizes in (PAPER, REDUCED):
            for batch in (None, 4 if quick else 16):
                per = {}
                for impl in ("fast", "reference"):
                    f = forward(sizes, batch, impl, T_fwd, repeats, r["roofline"])
                    per[impl] = f
                    r["forward"].append(f)
                    print(f"forward {sizes} batch={f['batch']} {impl}: "
                          f"{f['cell_ticks_per_s']/1e6:.2f} M cell-ticks/s", flush=True)
                per["fast"]["speedup_vs_reference"] = (per["fast"]["cell_ticks_per_s"]
                                                       / per["reference"]["cell_ticks_per_s"])
                per["reference"]["speedup_vs_reference"] = 1.0
    if "ablation" in sections:
        r["ablation"] = ablation(PAPER, T_fwd, repeats)
        print("ablation", {k: round(v["ms_per_step"], 3) for k, v in r["ablation"].items()
                           if isinstance(v, dict)}, flush=True)
    if "bptt" in sections:
        r["bptt"] = []
        chunk = _chunk_for(T_bptt)
        for impl, remat, ch in [("fast", False, None), ("fast", True, None),
                                ("fast", True, chunk), ("reference", True, None),
                                ("reference", False, None)]:
            b = bptt(PAPER, impl, T_bptt, 4, remat, ch, max(1, min(repeats, 3)),
                     max_mib=8192)
            r["bptt"].append(b)
            print(f"bptt {impl} remat={remat} chunk={ch}: mem {b['memory']['total_mib']:.0f} MiB"
                  + ("" if "skipped" in b else f" grad {b['grad_time']['median']:.2f}s ratio "
                     f"{b['grad_over_forward']:.2f}"), flush=True)
    if "memory" in sections:
        r["memory"] = bptt_memory(PAPER, "fast", mem_Ts, 4)
        print("memory", [(m["T"], m["remat"], m["remat_chunk"], round(m["total_mib"]))
                         for m in r["memory"]], flush=True)
    if "population" in sections:
        r["population"] = [population(sizes, pops, T_pop, (2, NUM_CPU_DEVICES),
                                      max(1, min(repeats, 3)))
                           for sizes in (PAPER, REDUCED)]
        print("population done", flush=True)
    if "scaling" in sections:
        r["scaling"] = scaling(quick, repeats)
    r["machine"]["loadavg_end"] = list(os.getloadavg())
    r["targets"] = check_targets(r)
    return r


def main(argv):
    del argv
    if FLAGS.scaling_worker:  # a fresh process: JAX must not have started yet
        result = scaling_worker(json.loads(FLAGS.scaling_worker))
        print(SCALING_RESULT_TAG + json.dumps(result), flush=True)
        return
    import jax
    # Before anything touches the backend: 8 CPU devices for the sharded runs.
    jax.config.update("jax_num_cpu_devices", NUM_CPU_DEVICES)
    repeats = FLAGS.repeats or (2 if FLAGS.quick else 5)
    unknown = set(FLAGS.sections) - set(SECTIONS)
    if unknown:
        raise app.UsageError(f"--sections: unknown {sorted(unknown)}; choose from "
                             f"{', '.join(SECTIONS)}.")
    results = run(FLAGS.quick, repeats, FLAGS.sections)
    md = to_markdown(results)
    print(md)
    with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=1)
    if FLAGS.markdown:
        with open(FLAGS.markdown, "w") as f:
            f.write(md + "\n")
    print(f"wrote {FLAGS.out}" + (f" and {FLAGS.markdown}" if FLAGS.markdown else ""))


if __name__ == "__main__":
    app.run(main)
