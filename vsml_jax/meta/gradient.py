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
`state.key`, so the same state always gives the same next state.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from vsml_jax.data import Dataset
from vsml_jax.learners import Learner
from vsml_jax.meta.objective import EpisodeSpec, episode_batch_loss
from vsml_jax.meta.sharding import check_divisible, replicated
from vsml_jax.runtime import put_replicated

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


def make_step_fn(learner: Learner, optimizer: optax.GradientTransformation,
                 data: Dataset, spec: EpisodeSpec, mesh: Optional[Mesh] = None,
                 schedule: Optional[optax.Schedule] = None
                 ) -> Callable[[GradientTrainState], Tuple[GradientTrainState, Dict]]:
    """A jitted meta-training step: sample episodes, BPTT, optimiser update.

    Args:
      learner: the Learner (for VS-ML with remat set in `vsml_learner`).
      optimizer: from `make_optimizer`.
      data: the meta-training dataset (images [N, D], labels [N]); passed to the
        jitted function as an argument, not baked in as a constant.
      spec: episode length, batch and augmentation.
      mesh: data parallelism: the batch of episodes is split over this mesh
        (all devices of all processes), params, optimiser state and data are
        replicated, and XLA all-reduces the gradient. `spec.batch` must be a
        multiple of the mesh size. The state passed in must be replicated on
        the mesh (the training loop does this).
      schedule: the optimiser's learning-rate schedule (`make_schedule`), to
        report the rate of each step as metric "lr".
    Returns:
      step_fn(state) -> (new state, {"loss", "accuracy", "grad_norm"}) where
      loss/accuracy are those of the episodes used for this step (before the
      update).
    """
    if mesh is not None:
        check_divisible("--batch_size", spec.batch, mesh)

    @functools.partial(jax.jit, out_shardings=None if mesh is None else replicated(mesh))
    def _step(state: GradientTrainState, data: Dataset):
        loss_fn = lambda p, k: episode_batch_loss(learner, p, k, data, spec, mesh)
        key, sub = jax.random.split(state.key)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, sub)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        new_state = GradientTrainState(step=state.step + 1, params=params,
                                       opt_state=opt_state, key=key)
        return new_state, metrics

    if mesh is not None:
        data = put_replicated(data, replicated(mesh))
    return lambda state: _step(state, data)
