"""The device mesh of a run and how work is spread over it.

Every run uses one 1-D mesh over all devices of all processes, axis "data".
What is split over it depends on the meta-optimiser:

- BPTT and cloning: the batch of episodes (or of cloned cells) is split over
  the devices (`batch_sharding`), params and optimiser state are replicated,
  and XLA inserts the all-reduce of the gradient (data parallelism with
  `jax.jit` and `NamedSharding`).
- Evolution strategies: the population is split (`shard_population`, with
  `jax.shard_map`): each device evaluates its members with the same
  per-member program as an unsharded run, so the fitness does not depend on
  the number of devices. Strategy state and data are replicated.

On several processes call `vsml_jax.runtime.start()` first.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def device_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all processes), axis "data"."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (params, optimiser and strategy state)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch or population) axis split over the devices."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_divisible(what: str, size: int, mesh: Mesh) -> None:
    """ValueError unless `size` (e.g. --batch_size) splits evenly over the mesh.

    The message names both numbers and the nearest valid sizes.
    """
    n = mesh.devices.size
    if size % n:
        lower, upper = (size // n) * n, (size // n + 1) * n
        options = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(f"{what}={size} must be a multiple of the {n} devices it is "
                         f"split over; use {what}={options} (or run on a number of "
                         f"devices that divides {size}).")


def check_population_size(popsize: int, mesh: Mesh) -> None:
    """`check_divisible` for an evolution population."""
    check_divisible("--popsize", popsize, mesh)


def shard_batch(tree, mesh: Optional[Mesh]):
    """Inside jit: constrain every leaf's leading axis to be split over `mesh`.

    With `mesh=None` (or one device) `tree` is returned unchanged.
    """
    if mesh is None or mesh.devices.size == 1:
        return tree
    return jax.lax.with_sharding_constraint(tree, batch_sharding(mesh))


def shard_population(fn: Callable, mesh: Optional[Mesh]) -> Callable:
    """Wraps `fn(population, *replicated) -> outputs` to run sharded on `mesh`.

    `population` (every leaf with a leading population axis) and the outputs
    (leading population axis) are split over the mesh axis; the remaining
    arguments are replicated. With `mesh=None` `fn` is returned unchanged.
    """
    if mesh is None:
        return fn

    def sharded(population, *replicated_args):
        pop = jax.tree_util.tree_leaves(population)[0].shape[0]
        check_population_size(pop, mesh)
        population = jax.lax.with_sharding_constraint(population, batch_sharding(mesh))
        mapped = jax.shard_map(
            fn, mesh=mesh,
            in_specs=(P(DATA_AXIS),) + (P(),) * len(replicated_args),
            out_specs=P(DATA_AXIS), check_vma=False)
        return mapped(population, *replicated_args)

    return sharded
