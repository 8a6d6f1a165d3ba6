"""The benchmark's pieces run end to end on a tiny grid (correctness only, no timing claims)."""
import os

import jax
import numpy as np

from experiments import benchmark


def test_benchmark_sections_run_on_a_tiny_grid():
    sizes = (6, 3)
    roof = dict(matmul=dict(gflops=1.0), tanh_big=dict(gelem_per_s=1.0),
                tanh_cache=dict(gelem_per_s=1.0))
    fwd = [benchmark.forward(sizes, None, "fast", 4, 1, roof),
           benchmark.forward(sizes, 2, "reference", 4, 1, roof)]
    for f in fwd:
        assert f["cell_ticks_per_s"] > 0 and f["time"]["min"] <= f["time"]["max"]
        assert 0 < f["fraction_of_limit"]
    bp = benchmark.bptt(sizes, "fast", 4, 2, True, 2, 1)
    assert bp["grad_over_forward"] > 0 and bp["memory"]["total_mib"] > 0
    mem = [dict(sizes=list(sizes), impl="fast", T=4, episodes=2, remat=True, remat_chunk=2,
                **bp["memory"])]
    pop = benchmark.population(sizes, (4,), 4, (2,), 1)
    sharded = [r for r in pop["runs"] if r["devices"] == 2]
    assert len(jax.devices()) < 2 or (sharded and sharded[0]["allclose"])
    assert [r for r in pop["runs"] if r["mode"] == "lax.map"][0]["allclose"]
    results = dict(quick=True, machine=benchmark.machine_info(), roofline=dict(
        matmul=dict(n=2, gflops=1.0), tanh_big=dict(elements=1, gelem_per_s=1.0),
        tanh_cache=dict(elements=1, loops=1, gelem_per_s=1.0)),
        forward=fwd, bptt=[bp], memory=mem, population=[pop])
    results["targets"] = benchmark.check_targets(results)
    md = benchmark.to_markdown(results)
    assert "forward unroll" in md and "ES population" in md and "BPTT memory" in md


def test_remat_chunk_is_the_divisor_nearest_sqrt_t():
    assert benchmark._chunk_for(100) == 10
    assert benchmark._chunk_for(2000) in (40, 50)
    assert 500 % benchmark._chunk_for(500) == 0
    assert np.isclose(benchmark.lstm_work_per_cell_tick(16)["matmul_flops"], 2048)


def test_scaling_section_runs_one_and_two_processes():
    """--sections=scaling, reduced: tiny steps on 1 device and on 2 processes x 1 device.

    Each configuration is a fresh worker process (the 2-process one a real
    jax.distributed job on 127.0.0.1); both meta-optimisers' library steps run
    and give the same loss whatever the devices.
    """
    sc = benchmark.scaling(quick=True, repeats=1, configs=[(1, 1), (2, 1)])
    assert sc["cpu_count"] == os.cpu_count()
    rows = {(r["problem"], r["processes"], r["devices"]): r for r in sc["runs"]}
    assert set(rows) == {(p, n, d) for p in ("bptt", "es") for n, d in [(1, 1), (2, 2)]}
    for p in ("bptt", "es"):
        one, two = rows[(p, 1, 1)], rows[(p, 2, 2)]
        assert one["speedup"] == 1.0 and one["efficiency_per_device"] == 1.0
        assert two["steps_per_s"] > 0 and two["efficiency_per_device"] == two["speedup"] / 2
        assert one["steps_done"] == two["steps_done"] == 1 + sc["rounds"] * sc["steps_per_round"]
        # The same computation on 1 and on 2 devices (ES: bitwise, BPTT: all-reduce order).
        np.testing.assert_allclose(two["final_loss"], one["final_loss"], rtol=1e-5)
    md = "\n".join(benchmark.scaling_markdown(sc))
    assert "| 2 x 1 | 2 |" in md and f"only {os.cpu_count()} devices add compute" in md
