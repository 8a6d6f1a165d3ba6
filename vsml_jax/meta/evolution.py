"""Evolutionary meta-training with evosax strategies (CMA-ES, OpenAI-ES, ...).

The meta variables are flattened to one vector (`ravel_pytree`, done by
evosax), a population is sampled around the strategy's mean (ask), every
member's meta-loss is computed on the *same* episodes and initial states
(common random numbers, which removes episode noise from the ranking), and
the strategy is updated with fitness = meta-loss, minimised (tell).

    strategy, es_params = make_strategy("cma_es", popsize=16, solution=params0,
                                        sigma_init=0.1)
    init_fn = make_init_fn(learner, strategy, es_params, seed=0)
    step_fn = make_step_fn(learner, strategy, es_params, data, spec, mesh)
    state = vsml_jax.training.loop.run(workdir, init_fn, step_fn, ...)
    params = strategy.get_mean(state.strategy_state)

The population can be sharded over devices (`vsml_jax.meta.sharding`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from evosax import algorithms as ea
from flax import struct
from jax.sharding import Mesh

from vsml_jax.data import Dataset
from vsml_jax.learners import Learner
from vsml_jax.meta.objective import EpisodeSpec, episodes_loss, sample_batch
from vsml_jax.meta.sharding import (StepProgram, check_population_size, replicated,
                                    shard_population)
from vsml_jax.training.loop import strong_types

# Short flag names -> evosax 0.3.2 class names; any exact class name also works.
STRATEGY_NAMES = {
    "cma_es": "CMA_ES", "sep_cma_es": "Sep_CMA_ES", "open_es": "Open_ES",
    "snes": "SNES", "xnes": "xNES", "pgpe": "PGPE", "simple_es": "SimpleES",
    "ars": "ARS", "ma_es": "MA_ES", "lm_ma_es": "LM_MA_ES", "cr_fm_nes": "CR_FM_NES",
    "simple_ga": "SimpleGA",
}


@struct.dataclass
class EvolutionTrainState:
    """step int32 [], the evosax strategy state, raw uint32 [2] PRNG key."""
    step: jax.Array
    strategy_state: Any
    key: jax.Array


def strategy_class(name: str):
    """The evosax class for a short name ("cma_es") or a class name ("CMA_ES")."""
    cls_name = STRATEGY_NAMES.get(name, name)
    if cls_name not in ea.algorithms:
        raise ValueError(f"evolution strategy {name!r} is unknown; use one of "
                         f"{sorted(STRATEGY_NAMES)} or an evosax class name "
                         f"({sorted(ea.algorithms)}).")
    return ea.algorithms[cls_name]


def make_strategy(name: str, popsize: int, solution: Any, sigma_init: float = 0.1,
                  es_lr: float = 0.01) -> Tuple[Any, Any]:
    """An evosax strategy over pytrees shaped like `solution`, and its params.

    Args:
      name: "cma_es", "open_es", ... (see STRATEGY_NAMES) or an evosax class name.
      popsize: population size (even for OpenAI-ES, which samples antithetically).
      solution: a params pytree (structure and size of the search space).
      sigma_init: initial standard deviation of the search distribution.
      es_lr: learning rate of OpenAI-ES's Adam on the estimated gradient.
    Returns:
      (strategy, strategy params).
    """
    cls = strategy_class(name)
    if cls is ea.Open_ES:
        if popsize % 2:
            raise ValueError(f"open_es samples antithetic pairs: popsize={popsize} "
                             "must be even.")
        # Antithetic pairs and centred ranks (evosax's default shaping for it).
        strategy = ea.Open_ES(popsize, solution, use_antithetic_sampling=True,
                              optimizer=optax.adam(es_lr),
                              std_schedule=optax.constant_schedule(sigma_init))
        return strategy, strategy.default_params
    strategy = cls(popsize, solution)
    params = strategy.default_params
    if hasattr(params, "std_init"):
        params = params.replace(std_init=jnp.asarray(sigma_init, jnp.float32))
    return strategy, params


def make_init_fn(learner: Learner, strategy, es_params, seed: int,
                 init_params: Any = None) -> Callable[[], EvolutionTrainState]:
    """`init_fn()` for the loop: the search distribution centred on the initial params.

    `init_params` (e.g. a cloned learner) replaces the random initialisation.
    """
    def init_fn() -> EvolutionTrainState:
        k_params, k_init, k_run = jax.random.split(jax.random.PRNGKey(seed), 3)
        params = learner.init_params(k_params) if init_params is None else init_params
        # Strong dtypes, as the step returns them (else the step compiles twice).
        s = strong_types(strategy.init(k_init, params, es_params))
        return EvolutionTrainState(step=jnp.zeros((), jnp.int32), strategy_state=s,
                                   key=k_run)
    return init_fn


def default_member_batch(platform: Optional[str] = None) -> Optional[int]:
    """How many population members to evaluate at once (None = all, by vmap).

    On a CPU one member at a time (`lax.map`) is faster: a vmapped grid of 64
    members' states no longer fits in cache, and the per-member program is
    already a good use of the cores (measured by `experiments.benchmark`).
    On GPU/TPU the whole population is vmapped, which fills the device.
    """
    platform = platform or jax.default_backend()
    return 1 if platform == "cpu" else None


def population_fitness(learner: Learner, population: Any, key: jax.Array,
                       episodes: Tuple[jax.Array, jax.Array],
                       member_batch: Optional[int] = None
                       ) -> Tuple[jax.Array, jax.Array]:
    """Meta-loss and accuracy [P] of every member on the same episodes and states.

    Args:
      population: params pytree, every leaf with a leading population axis P.
      key: PRNG key of the initial states (shared by all members).
      episodes: (inputs [E, T, ...], labels [E, T]), shared by all members.
      member_batch: members evaluated at once: None vmaps all P, n runs
        `lax.map` over chunks of n (n=1: one after another). The numbers are
        the same either way; only speed and memory differ.
    """
    def one(params):
        loss, metrics = episodes_loss(learner, params, key, episodes)
        return loss, metrics["accuracy"]
    if member_batch is None:
        return jax.vmap(one)(population)
    return jax.lax.map(one, population, batch_size=member_batch)


def make_step(learner: Learner, strategy, es_params, data: Dataset,
              spec: EpisodeSpec, mesh: Optional[Mesh] = None,
              member_batch: Optional[int] | str = "auto") -> StepProgram:
    """A generation as a program: ask, evaluate (sharded over `mesh` if given), tell.

    `member_batch` is passed to `population_fitness` ("auto":
    `default_member_batch()` for the platform the mesh or default device is on).

    Returns a StepProgram: `.jitted(state, data)`, `.data` (host arrays,
    placed replicated on the mesh only when the step first runs) and
    `program(state) -> (new state, metrics)`. Metrics: "loss"/"accuracy" of
    the distribution mean (evaluated on the same episodes as the population,
    before the update), "pop_loss" (population mean), "best_loss" (best
    member this generation), "sigma" (mean std).
    """
    if mesh is not None:
        check_population_size(strategy.population_size, mesh,
                              even=isinstance(strategy, ea.Open_ES))

    if member_batch == "auto":
        platform = mesh.devices.flat[0].platform if mesh is not None else None
        member_batch = default_member_batch(platform)

    def fitness_fn(population, key, inputs, labels):
        return population_fitness(learner, population, key, (inputs, labels),
                                  member_batch)

    sharded_fitness = shard_population(fitness_fn, mesh)
    # The strategy samples in float32; a learner of another dtype (e.g.
    # bfloat16) gets its members in its own dtypes, as its unroll expects.
    template = jax.eval_shape(learner.init_params, jax.random.PRNGKey(0))
    as_learner = lambda tree: jax.tree_util.tree_map(
        lambda x, t: x.astype(t.dtype), tree, template)

    @functools.partial(jax.jit, out_shardings=None if mesh is None else replicated(mesh))
    def _step(state: EvolutionTrainState, data: Dataset):
        key, k_ask, k_data, k_state, k_tell = jax.random.split(state.key, 5)
        population, s = strategy.ask(k_ask, state.strategy_state, es_params)
        inputs, labels = sample_batch(k_data, data, spec)
        fitness, _ = sharded_fitness(as_learner(population), k_state, inputs, labels)
        mean = as_learner(strategy.get_mean(state.strategy_state))
        mean_loss, mean_metrics = episodes_loss(learner, mean, k_state, (inputs, labels))
        s, _ = strategy.tell(k_tell, population, fitness, s, es_params)
        metrics = {"loss": mean_loss, "accuracy": mean_metrics["accuracy"],
                   "pop_loss": jnp.mean(fitness), "best_loss": jnp.min(fitness),
                   "sigma": jnp.mean(jnp.asarray(getattr(s, "std", jnp.nan)))}
        s = strong_types(s)  # e.g. a Python-float std from a schedule
        return EvolutionTrainState(step=state.step + 1, strategy_state=s, key=key), metrics

    return StepProgram(_step, data, mesh)


def make_step_fn(learner: Learner, strategy, es_params, data: Dataset,
                 spec: EpisodeSpec, mesh: Optional[Mesh] = None,
                 member_batch: Optional[int] | str = "auto"
                 ) -> Callable[[EvolutionTrainState], Tuple[EvolutionTrainState, Dict]]:
    """`make_step(...)` with its data placed on the mesh now (the state arrives
    replicated on the mesh: the training loop builds it with jit, identically
    on every process): step_fn(state) -> (new state, metrics)."""
    program = make_step(learner, strategy, es_params, data, spec, mesh, member_batch)
    program.placed_data()
    return program


def mean_params(strategy, state: EvolutionTrainState, learner: Optional[Learner] = None
                ) -> Any:
    """The current centre of the search distribution as a params pytree.

    The strategy keeps it in float32; with `learner`, each leaf is cast to the
    learner's own dtype (e.g. bfloat16), as its unroll and exported files expect.
    """
    mean = strategy.get_mean(state.strategy_state)
    if learner is None:
        return mean
    template = jax.eval_shape(learner.init_params, jax.random.PRNGKey(0))
    return jax.tree_util.tree_map(lambda x, t: x.astype(t.dtype), mean, template)
