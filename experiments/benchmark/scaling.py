"""Scaling section: meta-training steps/s of the real training step on 1, 2,
4, 8 CPU devices of one process and on 2 processes x 2 devices, each in a
fresh worker process (see `harness`), with speed-up and efficiency."""
from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Dict, List, Optional, Sequence

from experiments.benchmark.harness import (finish_scaling_workers, machine_busy_seconds,
                                           start_scaling_workers, wait_for_quiet)
from experiments.benchmark.tools import _block, _fmt_t


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
