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

import math
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vsml_jax.runtime import put_replicated

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


def check_divisible(what: str, size: int, mesh: Mesh, even: bool = False) -> None:
    """ValueError unless `size` (e.g. --batch_size) splits evenly over the mesh.

    With `even=True` (OpenAI-ES's antithetic pairs) `size` must also be even,
    i.e. a multiple of lcm(devices, 2). The message names both numbers and
    the nearest valid sizes, which satisfy every rule at once.
    """
    n = mesh.devices.size
    step = n * 2 // math.gcd(n, 2) if even else n
    if size % step:
        lower, upper = (size // step) * step, (size // step + 1) * step
        options = f"{lower} or {upper}" if lower else f"{upper}"
        rule = f"a multiple of the {n} devices it is split over"
        if even:
            rule += f" and even (antithetic pairs), so a multiple of {step}"
        raise ValueError(f"{what}={size} must be {rule}; use {what}={options} (or run "
                         f"on a number of devices that divides {size}).")


def check_population_size(popsize: int, mesh: Mesh, even: bool = False) -> None:
    """`check_divisible` for an evolution population (`even`: antithetic pairs)."""
    check_divisible("--popsize", popsize, mesh, even)


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
        # The population is computed from the replicated strategy state, so
        # every device holds all of it: shard_map then takes each device's
        # members by a local slice, and the strategy's update reads the same
        # replicated copy. Constraining it to be split instead let XLA split
        # the sampling too and all-gather the population back for the update
        # (on TPU fused into the time loops of the step, measured with
        # vsml_jax.runs.plan); now the only collective is the [P] fitness.
        population = jax.lax.with_sharding_constraint(population, replicated(mesh))
        mapped = jax.shard_map(
            fn, mesh=mesh,
            in_specs=(P(DATA_AXIS),) + (P(),) * len(replicated_args),
            out_specs=P(DATA_AXIS), check_vma=False)
        return mapped(population, *replicated_args)

    return sharded


class StepProgram:
    """A training step as a program and its data, before anything is on a device.

    `jitted(state, data) -> (state, metrics)` is the jitted step (data is an
    argument, not a constant baked into the program); `data` is what it is
    called with, as host arrays. Nothing is placed on a device until the step
    first runs, so the same object can be lowered for devices that are not
    there (`jitted.lower(state_spec, data_spec)`, `vsml_jax.runs.plan`).

    Attributes:
      jitted: the jax.jit function of (state, data).
      data: the step's data (a pytree of host arrays, e.g. a Dataset).
      mesh: the mesh the step runs on (None: the default device).
    """

    def __init__(self, jitted: Callable, data: Any, mesh: Optional[Mesh]):
        self.jitted = jitted
        self.data = data
        self.mesh = mesh
        self._placed = None

    def data_sharding(self) -> Optional[NamedSharding]:
        """Where `data` lives when the step runs: replicated on the mesh (or None)."""
        return None if self.mesh is None else replicated(self.mesh)

    def placed_data(self) -> Any:
        """`data` on the mesh (once; later calls return the same arrays)."""
        if self._placed is None:
            if self.mesh is None:
                self._placed = self.data
            else:
                self._placed = put_replicated(self.data, self.data_sharding())
        return self._placed

    def __call__(self, state: Any) -> Tuple[Any, Any]:
        """One step: (new state, metrics)."""
        return self.jitted(state, self.placed_data())
