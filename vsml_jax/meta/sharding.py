"""Spreading an evolution population over devices (and hosts).

The population axis is split over a one-dimensional device mesh ("pop");
strategy state and data stay replicated. Each device evaluates its slice of
the population with the same per-member program as an unsharded run (via
`jax.shard_map`), so the fitness does not depend on the number of devices.

On a multi-host pod call `maybe_initialize_distributed()` first; on one host
it does nothing.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

POP_AXIS = "pop"

# Environment variables that only exist when a job spans several hosts.
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS",
                  "TPU_WORKER_HOSTNAMES", "SLURM_STEP_NUM_NODES", "OMPI_COMM_WORLD_SIZE")


def multihost_env_detected() -> bool:
    """True when the environment describes a job on more than one host."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        return True
    nodes = os.environ.get("SLURM_STEP_NUM_NODES") or os.environ.get("OMPI_COMM_WORLD_SIZE")
    if nodes and nodes.isdigit() and int(nodes) > 1:
        return True
    return any(os.environ.get(k) for k in _MULTIHOST_ENV[:3])


def maybe_initialize_distributed(force: bool = False) -> bool:
    """Calls `jax.distributed.initialize()` on a multi-host job (or if `force`).

    Must run before any other JAX call. Returns whether it initialised.
    """
    if not (force or multihost_env_detected()):
        return False
    jax.distributed.initialize()
    return True


def population_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all hosts), axis "pop"."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (POP_AXIS,))


def check_population_size(popsize: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if popsize % n:
        raise ValueError(f"population size {popsize} must be a multiple of the "
                         f"{n} devices it is sharded over; use --popsize="
                         f"{max(n, (popsize // n) * n)} or a multiple of {n}.")


def shard_population(fn: Callable, mesh: Optional[Mesh]) -> Callable:
    """Wraps `fn(population, *replicated) -> outputs` to run sharded on `mesh`.

    `population` (every leaf with a leading population axis) and the outputs
    (leading population axis) are split over the "pop" axis; the remaining
    arguments are replicated. With `mesh=None` `fn` is returned unchanged.
    """
    if mesh is None:
        return fn

    def sharded(population, *replicated):
        pop = jax.tree_util.tree_leaves(population)[0].shape[0]
        check_population_size(pop, mesh)
        population = jax.lax.with_sharding_constraint(
            population, NamedSharding(mesh, P(POP_AXIS)))
        mapped = jax.shard_map(
            fn, mesh=mesh,
            in_specs=(P(POP_AXIS),) + (P(),) * len(replicated),
            out_specs=P(POP_AXIS), check_vma=False)
        return mapped(population, *replicated)

    return sharded
