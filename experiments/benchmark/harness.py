"""The multi-process harness of the scaling section: start worker processes
(one jax.distributed job on 127.0.0.1 when several), wait for them, and
measure the load of other processes on the machine."""
from __future__ import annotations

import json
import os
import resource
import time
from typing import Dict, List

from experiments.benchmark.tools import REPO


# Prefix of the line on which a worker prints its JSON result.
SCALING_RESULT_TAG = "SCALING_RESULT "


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
