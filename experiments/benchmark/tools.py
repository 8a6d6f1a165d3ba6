"""Shared pieces of the benchmark sections: timing, compiling, memory of a
compiled function, FLOP counts, machine description and random VS-ML problems."""
from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import time
from typing import Callable, Dict, Optional, Sequence


PAPER = (784, 10)
REDUCED = (49, 10)
NUM_CPU_DEVICES = 8
SECTIONS = ("roofline", "forward", "ablation", "bptt", "memory", "population", "scaling")
# The repository root (scaling workers start there).
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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



def _fmt_t(t: Dict) -> str:
    return f"{t['median']:.3f} [{t['min']:.3f}, {t['max']:.3f}]"
