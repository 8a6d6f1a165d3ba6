"""Forward section: cell micro-ticks per second of the forward unroll, fast
kernel and per-cell reference, batch 1 and a vmapped batch."""
from __future__ import annotations

from typing import Dict, Optional

from experiments.benchmark.tools import (compile_fn, episode_loss_fn,
                                         lstm_work_per_cell_tick, make_problem, time_calls)


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
