"""Gradient meta-training: BPTT through whole episodes, optimised with optax.

The meta-loss (`vsml_jax.meta.objective`) is differentiated through the
unrolled online episodes. For VS-ML, build the learner with
`vsml_learner(cfg, remat=True)` (or `remat_chunk=k`) so the backward pass
stores only the per-step carries instead of every activation, which keeps
memory bounded for long episodes.

    learner = vsml_learner(cfg, remat=True)
    optimizer = make_optimizer("adam", lr=1e-2, clip_norm=1.0)
    init_fn = make_init_fn(learner, optimizer, seed=0)
    step_fn = make_step_fn(learner, optimizer, train_data, EpisodeSpec(100, 4))
    state = vsml_jax.training.loop.run(workdir, init_fn, step_fn, num_steps, ...)

`step_fn(state) -> (state, metrics)` is jitted; all its randomness comes from
`state.key`, so the same state always gives the same next state. `make_step`
gives the same step as a program (`.jitted(state, data)`, host `.data`) that
can be compiled ahead of time for devices that are not there
(`vsml_jax.runs.plan`); `micro_batch=M` accumulates the gradient over groups
of M episodes inside the step (less memory, the same gradient).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, PartitionSpec as P

from vsml_jax.data import Dataset
from vsml_jax.learners import Learner
from vsml_jax.meta.objective import (EpisodeSpec, episode_batch_loss, episodes_mean,
                                     sample_batch)
from vsml_jax.meta.sharding import StepProgram, check_divisible, replicated

OPTIMIZERS = ("adam", "sgd")


@struct.dataclass
class GradientTrainState:
    """Everything a resumed run needs (saved whole in every checkpoint).

    Attributes:
      step: int32 [], meta-training steps done.
      params: meta variables of the learner.
      opt_state: the optax state.
      key: raw uint32 [2] PRNG key; split once per step.
    """
    step: jax.Array
    params: Any
    opt_state: Any
    key: jax.Array


def make_schedule(lr: float, decay_steps: int = 0, final_lr_fraction: float = 0.1
                  ) -> optax.Schedule:
    """The learning rate by step: constant, or a cosine from `lr` down to
    `final_lr_fraction * lr` over `decay_steps` steps (then constant)."""
    return (optax.cosine_decay_schedule(lr, decay_steps, alpha=final_lr_fraction)
            if decay_steps else optax.constant_schedule(lr))


def make_optimizer(name: str = "adam", lr: float = 1e-2, clip_norm: Optional[float] = 1.0,
                   b1: float = 0.9, b2: float = 0.999, momentum: float = 0.0,
                   decay_steps: int = 0, final_lr_fraction: float = 0.1
                   ) -> optax.GradientTransformation:
    """The meta-optimiser: global-norm clipping (if clip_norm > 0) then adam/sgd.

    With decay_steps > 0 the learning rate follows a cosine from `lr` down to
    `final_lr_fraction * lr` over `decay_steps` steps, then stays there.

    The optimiser state has the same structure whatever the settings (the
    clipping stage is always there, with an infinite bound when off, and the
    rate is always a schedule), so a run may resume with a new learning rate,
    schedule or clipping.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"meta optimizer {name!r} is unknown for gradient training; "
                         f"use one of {OPTIMIZERS}.")
    if not lr > 0:
        raise ValueError(f"lr={lr} must be positive.")
    if decay_steps < 0:
        raise ValueError(f"decay_steps={decay_steps} must be >= 0 (0: constant lr).")
    if not 0 <= final_lr_fraction <= 1:
        raise ValueError(f"final_lr_fraction={final_lr_fraction} must be in [0, 1] (a "
                         "negative one turns the schedule into gradient ascent).")
    if clip_norm is not None and clip_norm < 0:
        raise ValueError(f"clip_norm={clip_norm} must be >= 0 (0 or None: off).")
    schedule = make_schedule(lr, decay_steps, final_lr_fraction)
    base = (optax.adam(schedule, b1=b1, b2=b2) if name == "adam"
            else optax.sgd(schedule, momentum=momentum or None))
    return optax.chain(optax.clip_by_global_norm(clip_norm or float("inf")), base)


def make_init_fn(learner: Learner, optimizer: optax.GradientTransformation, seed: int,
                 init_params: Any = None) -> Callable[[], GradientTrainState]:
    """`init_fn()` for the training loop.

    Args:
      learner: the Learner to meta-train.
      optimizer: from `make_optimizer`.
      seed: the run's seed; params (unless given) and the step keys derive from it.
      init_params: start from these meta variables instead of a random init
        (e.g. a cloned or previously meta-trained learner).
    """
    @jax.jit  # one compilation instead of many small eager dispatches
    def _init(params):
        k_params, k_run = jax.random.split(jax.random.PRNGKey(seed))
        params = learner.init_params(k_params) if params is None else params
        return GradientTrainState(step=jnp.zeros((), jnp.int32), params=params,
                                  opt_state=optimizer.init(params), key=k_run)

    return lambda: _init(init_params)


def check_micro_batch(micro_batch: int, batch: int, mesh: Optional[Mesh] = None) -> int:
    """The number of micro-batches of a step; ValueError naming valid sizes otherwise.

    `micro_batch` counts episodes over all devices (0: the whole batch, one
    pass). It must divide `batch` and, on a mesh of n devices, be a multiple
    of n (each device runs micro_batch / n episodes at a time).
    """
    if micro_batch < 0:
        raise ValueError(f"--micro_batch={micro_batch} must be >= 0 (0: the whole batch).")
    if micro_batch == 0:
        return 1
    n = 1 if mesh is None else mesh.devices.size
    if batch % micro_batch or micro_batch % n:
        valid = [m for m in range(n, batch + 1, n) if batch % m == 0]
        raise ValueError(
            f"--micro_batch={micro_batch} must divide --batch_size={batch} and be a "
            f"multiple of the {n} device{'s' * (n > 1)} the batch is split over; valid: "
            f"{', '.join(map(str, valid[:12]))}{' ...' if len(valid) > 12 else ''} "
            "(0: the whole batch at once).")
    return batch // micro_batch


def accumulated_loss_and_grad(learner: Learner, params: Any, key: jax.Array,
                              data: Dataset, spec: EpisodeSpec, micro_batches: int,
                              mesh: Optional[Mesh] = None
                              ) -> Tuple[Tuple[jax.Array, Dict], Any]:
    """`value_and_grad` of `episode_batch_loss`, the batch run in micro-batches.

    The same episodes and initial states as `episode_batch_loss(..., key, ...)`
    are split into `micro_batches` groups of equal size (on a mesh: each
    device splits its own share); a `lax.scan` runs them one after another,
    summing gradients and metrics in float32, so only one group's
    activations are alive at a time. Groups of equal size make the mean of
    the group means the mean over the batch: the result equals the one-pass
    gradient up to float reassociation. On a mesh the sums stay on each
    device and are averaged over the devices once, after the scan.

    Returns:
      ((loss [], {"loss", "accuracy"}), grads shaped like params).
    """
    k_data, k_state = jax.random.split(key)          # as episode_batch_loss
    inputs, labels = sample_batch(k_data, data, spec)
    keys = jax.random.split(k_state, spec.batch)      # as episodes_loss
    sharded = mesh is not None and mesh.devices.size > 1

    def local(params, keys, inputs, labels):
        # [E_local, ...] -> [micro_batches, E_local / micro_batches, ...]
        split = lambda x: x.reshape((micro_batches, -1) + x.shape[1:])
        f32 = lambda t: jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), t)

        def body(acc, group):
            (loss, accuracy), g = jax.value_and_grad(
                lambda p: episodes_mean(learner, p, *group), has_aux=True)(params)
            g = jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32), acc[0], g)
            return (g, acc[1] + loss, acc[2] + accuracy), None

        zero = jnp.zeros((), jnp.float32)
        (g, loss, accuracy), _ = jax.lax.scan(
            body, (f32(params), zero, zero), (split(keys), split(inputs), split(labels)))
        out = jax.tree_util.tree_map(lambda x: x / micro_batches, (g, loss, accuracy))
        return jax.lax.pmean(out, mesh.axis_names[0]) if sharded else out

    if sharded:
        axis = mesh.axis_names[0]
        local = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis), P(axis), P(axis)),
                              out_specs=P(), check_vma=False)
    g, loss, accuracy = local(params, keys, inputs, labels)
    grads = jax.tree_util.tree_map(lambda x, p: x.astype(p.dtype), g, params)
    return (loss, {"loss": loss, "accuracy": accuracy}), grads


def make_step(learner: Learner, optimizer: optax.GradientTransformation,
              data: Dataset, spec: EpisodeSpec, mesh: Optional[Mesh] = None,
              schedule: Optional[optax.Schedule] = None, micro_batch: int = 0
              ) -> StepProgram:
    """The meta-training step as a program: sample episodes, BPTT, optimiser update.

    Args:
      learner: the Learner (for VS-ML with remat set in `vsml_learner`).
      optimizer: from `make_optimizer`.
      data: the meta-training dataset (images [N, D], labels [N]); passed to the
        jitted function as an argument, not baked in as a constant.
      spec: episode length, batch and augmentation.
      mesh: data parallelism: the batch of episodes is split over this mesh
        (all devices of all processes), params, optimiser state and data are
        replicated, and the gradient is all-reduced once per step.
        `spec.batch` must be a multiple of the mesh size. The state passed in
        must be replicated on the mesh (the training loop does this).
      schedule: the optimiser's learning-rate schedule (`make_schedule`), to
        report the rate of each step as metric "lr".
      micro_batch: gradient accumulation: run the batch in groups of this
        many episodes (over all devices) and sum their gradients inside the
        step (`accumulated_loss_and_grad`); same result, less memory. 0 (or
        spec.batch): the whole batch in one pass.
    Returns:
      a StepProgram: `.jitted(state, data)`, `.data` (host arrays, placed on
      the mesh only when the step first runs) and `program(state) -> (new
      state, {"loss", "accuracy", "grad_norm"[, "lr"]})`, where loss/accuracy
      are those of the episodes used for this step (before the update).
    """
    if mesh is not None:
        check_divisible("--batch_size", spec.batch, mesh)
    micro_batches = check_micro_batch(micro_batch, spec.batch, mesh)

    def loss_and_grad(params, key, data):
        if micro_batches > 1:
            return accumulated_loss_and_grad(learner, params, key, data, spec,
                                             micro_batches, mesh)
        loss_fn = lambda p: episode_batch_loss(learner, p, key, data, spec, mesh)
        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    @functools.partial(jax.jit, out_shardings=None if mesh is None else replicated(mesh))
    def _step(state: GradientTrainState, data: Dataset):
        key, sub = jax.random.split(state.key)
        (_, metrics), grads = loss_and_grad(state.params, sub, data)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        new_state = GradientTrainState(step=state.step + 1, params=params,
                                       opt_state=opt_state, key=key)
        return new_state, metrics

    return StepProgram(_step, data, mesh)


def make_step_fn(learner: Learner, optimizer: optax.GradientTransformation,
                 data: Dataset, spec: EpisodeSpec, mesh: Optional[Mesh] = None,
                 schedule: Optional[optax.Schedule] = None, micro_batch: int = 0
                 ) -> Callable[[GradientTrainState], Tuple[GradientTrainState, Dict]]:
    """`make_step(...)` with its data placed on the mesh now: step_fn(state) ->
    (new state, {"loss", "accuracy", "grad_norm"[, "lr"]}) for the training loop."""
    program = make_step(learner, optimizer, data, spec, mesh, schedule, micro_batch)
    program.placed_data()
    return program
