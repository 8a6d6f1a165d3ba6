"""Start-up of a run on one or many processes, and who does what in it.

A run is one multi-controller JAX job: every process of every host runs the
same program on a mesh of all devices (`vsml_jax.meta.sharding.device_mesh`).
This module holds what must happen once per process, before anything else:

    cluster = Cluster(coordinator_address="10.0.0.1:1234", num_processes=4,
                      process_id=int(os.environ["RANK"]))   # or Cluster() to auto-detect
    start(cluster)            # jax.distributed.initialize(), before any JAX backend use
    if is_primary(): ...      # only process 0 writes files

and the few helpers a multi-process run needs on top of jit:

- `put_replicated(tree, sharding)`: a host value that every process computed
  identically becomes one global, replicated array. (`jax.device_put` of a
  host value onto a global sharding compares the value across processes,
  which fails for values holding NaN, as evosax's initial `best_solution`.)
- `to_host(tree)`: numpy copies of replicated (or any) global arrays.
- `PreemptionWatch`: SIGTERM (what Cloud TPU and spot VMs send before taking
  a machine) seen at the same step by every process, through JAX's
  preemption sync point; a plain signal flag when there is one process.

On CPU the processes talk through gloo collectives, so N local processes
(each with `JAX_NUM_CPU_DEVICES` devices) form a real cluster to try things on.
"""
from __future__ import annotations

import dataclasses
import logging as py_logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Optional

import jax
import numpy as np
from absl import logging

# Environment variables that only exist when a job spans several processes
# and that jax.distributed.initialize() can read its cluster from.
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where this process sits in a multi-process job (the arguments of
    `jax.distributed.initialize`). All None: auto-detect (Cloud TPU pods,
    SLURM, Open MPI, ...) when the environment describes a cluster, else run
    as a single process.

    Attributes:
      coordinator_address: "host:port" of process 0's coordination service.
      num_processes: processes in the job.
      process_id: this process, 0 .. num_processes - 1.
      initialize: call jax.distributed.initialize() even when nothing was
        given or detected (it then auto-detects or fails with JAX's message).
      heartbeat_timeout_s: a process not heard from for this long is declared
        dead and the others stop with an error instead of waiting forever.
    """
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    initialize: bool = False
    heartbeat_timeout_s: int = 100

    def __post_init__(self):
        given = [self.coordinator_address is not None, self.num_processes is not None,
                 self.process_id is not None]
        if any(given) and not all(given):
            raise ValueError(
                "--coordinator_address, --num_processes and --process_id go together: "
                "give all three (or none, to let JAX detect the cluster).")
        if self.coordinator_address is not None:
            host, sep, port = self.coordinator_address.rpartition(":")
            if not (sep and host.strip("[]") and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(
                    f"--coordinator_address={self.coordinator_address!r}: give HOST:PORT "
                    "of process 0, e.g. 10.0.0.1:1234 or localhost:1234.")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"--num_processes={self.num_processes} must be >= 1.")
        if self.process_id is not None and not 0 <= self.process_id < (self.num_processes or 1):
            raise ValueError(f"--process_id={self.process_id} must be in 0 .. "
                             f"{(self.num_processes or 1) - 1} (--num_processes="
                             f"{self.num_processes}).")
        if self.heartbeat_timeout_s < 1:
            raise ValueError(f"--heartbeat_timeout={self.heartbeat_timeout_s} must be >= 1 s.")

    @property
    def explicit(self) -> bool:
        return self.coordinator_address is not None


def cluster_detected() -> bool:
    """True when the environment describes a job of more than one process."""
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    for var in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 1:
            return True
    return any(os.environ.get(k) for k in _CLUSTER_ENV)


def backend_started() -> bool:
    """Whether some JAX call already initialised the XLA backends."""
    from jax._src import xla_bridge  # no public API tells this
    return bool(xla_bridge._backends)


_started = False


def start(cluster: Optional[Cluster] = None) -> None:
    """Prepares this process for a run; call it before any other JAX call.

    Joins the multi-process job described by `cluster` (or detected from the
    environment) with `jax.distributed.initialize`, choosing gloo collectives
    for CPU devices. A single process needs nothing and gets nothing. Also
    quiets JAX's "Unable to initialize backend 'tpu'" INFO line, which every
    CPU-only run would print. Calling it again is a no-op.

    Raises:
      RuntimeError: a multi-process start was asked for after a JAX backend
        was already initialised (then jax.distributed cannot join any more).
    """
    global _started
    # The line comes from jax's platform probing through Python logging.
    py_logging.getLogger("jax._src.xla_bridge").setLevel(py_logging.WARNING)
    if _started:
        return
    cluster = cluster or Cluster()
    multi = cluster.explicit or cluster.initialize or cluster_detected()
    if multi and cluster.num_processes != 1:
        if backend_started():
            raise RuntimeError(
                "a JAX backend was initialised before jax.distributed.initialize(); "
                "call vsml_jax.runtime.start() first thing in main (no JAX arrays, "
                "evosax imports or device queries before it).")
        # Only the CPU client reads this; GPU/TPU collectives are unaffected.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        kwargs = {}
        if cluster.explicit:
            kwargs = dict(coordinator_address=cluster.coordinator_address,
                          num_processes=cluster.num_processes,
                          process_id=cluster.process_id)
            if cluster.process_id == 0:
                check_port_free(cluster.coordinator_address)
        with _WaitingNotice(cluster):
            jax.distributed.initialize(heartbeat_timeout_seconds=cluster.heartbeat_timeout_s,
                                       **kwargs)
        logging.info("Joined a job of %d processes as process %d (%d of %d devices "
                     "local).", jax.process_count(), jax.process_index(),
                     jax.local_device_count(), jax.device_count())
    _started = True


class ClusterStartError(RuntimeError):
    """This process cannot join (or start) the multi-process job; the message says why."""


def check_port_free(address: str) -> None:
    """Raises ClusterStartError when process 0 cannot listen on `address`'s port.

    JAX's coordination service binds that port in C++ and, when it is taken,
    crashes process 0 while the others wait for minutes; a plain socket bind
    first turns that into one line.
    """
    port = int(address.rpartition(":")[2])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: a port left in TIME_WAIT by an earlier run is usable;
        # one another process listens on is not (Linux refuses that bind).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            raise ClusterStartError(
                f"--coordinator_address={address}: process 0 cannot listen on port {port} "
                f"({e.strerror or e}); another run (or program) holds it. Stop it, or give "
                "every process another free port.") from None


class _WaitingNotice:
    """While `jax.distributed.initialize` waits for the other processes, says so
    (after 5 s, then every 30 s: JAX itself is silent until its timeout), and
    stops the process with exit status 0 on SIGTERM.

    The main thread sits in C++ then, where Python signal handlers cannot run
    until the wait ends; `signal.set_wakeup_fd` has the C-level handler write
    the signal number to a pipe this thread watches, so SIGTERM acts at once.
    """

    _STOP = b"\x00"  # written by __exit__; no signal has number 0

    def __init__(self, cluster: Cluster, first_s: float = 5.0, every_s: float = 30.0):
        self.cluster, self.first_s, self.every_s = cluster, first_s, every_s
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._old_fd = None

    def _run(self):
        import select
        t0 = time.monotonic()
        wait = self.first_s
        c = self.cluster
        where = c.coordinator_address or "the address the environment gives"
        who = (f"process {c.process_id} of {c.num_processes}" if c.explicit
               else "this process")
        while True:
            ready, _, _ = select.select([self._read], [], [], wait)
            if ready:
                got = os.read(self._read, 64)
                if bytes([signal.SIGTERM]) in got:
                    workdir = sys.modules.get("vsml_jax.training.workdir")
                    if workdir is not None:
                        workdir.release_all()
                    sys.stderr.write("Stopped by SIGTERM while waiting for the other "
                                     "processes: nothing to save.\n")
                    sys.stderr.flush()
                    os._exit(0)
                if self._STOP in got:
                    return
                continue
            logging.warning(
                "%s: waiting %.0f s so far for all processes to join the job at %s "
                "(each must be started with the same --coordinator_address and "
                "--num_processes and its own --process_id).", who,
                time.monotonic() - t0, where)
            wait = self.every_s

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old_fd = signal.set_wakeup_fd(self._write)
        threading.Thread(target=self._run, daemon=True, name="waiting-notice").start()
        return self

    def __exit__(self, *exc):
        if self._old_fd is not None:
            signal.set_wakeup_fd(self._old_fd)
        os.write(self._write, self._STOP)
        return False


def is_primary() -> bool:
    """True on the process that writes files (process 0)."""
    return jax.process_index() == 0


def multi_process() -> bool:
    return jax.process_count() > 1


def sync(name: str) -> None:
    """A barrier of all processes (no-op with one process)."""
    if multi_process():
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def put_replicated(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Host values (the same on every process) as global arrays with `sharding`.

    Built from each process's own copy (`jax.make_array_from_callback`), with
    no cross-process comparison of values.
    """
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    return jax.tree_util.tree_map(put, tree)


def to_host(tree: Any) -> Any:
    """numpy copies of the leaves of `tree` (global arrays of any sharding).

    A fully replicated array is read from a local shard; a sharded one is
    gathered from all processes (a collective: call it on every process).
    """
    def get(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree_util.tree_map(get, tree)


class PreemptionWatch:
    """Tells every process at the same step that the job is being preempted.

    With several processes it asks JAX's preemption sync point (the
    coordination service turns a SIGTERM to any process into the same answer
    at the same step on all of them); with one process it installs a SIGTERM
    handler that sets a flag (restored by `close`).
    """

    def __init__(self):
        self._flag = False
        self._old_handler = None
        if not multi_process():
            try:
                self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            except ValueError:  # not the main thread: no signal handling
                self._old_handler = None

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._flag = True

    def reached(self, step: int) -> bool:
        """True when the run should save at `step` and stop (call at every step,
        on every process)."""
        if multi_process():
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(int(step))
        return self._flag

    def close(self) -> None:
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
            self._old_handler = None
