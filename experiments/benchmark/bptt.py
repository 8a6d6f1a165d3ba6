"""BPTT and memory sections: the meta-gradient step (time, gradient / forward
ratio) and its compiled memory with and without rematerialisation."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

from experiments.benchmark.tools import (compile_fn, episode_loss_fn, make_problem,
                                         memory_of, time_calls)


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
