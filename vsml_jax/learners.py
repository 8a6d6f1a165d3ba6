"""A common interface for everything that learns online from a stream.

Meta-training, evaluation and the baselines all speak to a `Learner`:

    params = learner.init_params(key)            # meta variables (a pytree)
    state = learner.init_state(key)              # per-episode variables
    state, out = learner.unroll(params, state, (inputs [T, D], labels [T, C]))
    # out.logits [T, C], out.loss [T], out.correct [T]  (vsml_jax.StepOutput)

`unroll` must be pure (jit / vmap / grad), predict y_t before it is seen,
and learn only from what the stream has shown so far.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Tuple

import jax

from vsml_jax.config import VSMLConfig
from vsml_jax.network import StepOutput, unroll
from vsml_jax.params import init_params
from vsml_jax.state import init_state

Unroll = Callable[[Any, Any, Tuple[jax.Array, jax.Array]], Tuple[Any, StepOutput]]


@dataclasses.dataclass(frozen=True)
class Learner:
    """An online learner: how to make its variables and how to run it.

    Attributes:
      name: short identifier used in logs, JSON and plots (e.g. "vsml").
      init_params: key -> meta variables (None for learners with none).
      init_state: key -> per-episode state.
      unroll: (params, state, data) -> (state, StepOutput), pure.
      config: the static description of the learner (for checkpoints and logs).
    """
    name: str
    init_params: Callable[[jax.Array], Any]
    init_state: Callable[[jax.Array], Any]
    unroll: Unroll
    config: Any = None


def vsml_learner(cfg: VSMLConfig, **unroll_kwargs) -> Learner:
    """The VS Meta RNN as a Learner (`unroll_kwargs` go to `vsml_jax.unroll`)."""
    return Learner(
        name="vsml",
        init_params=lambda key: init_params(key, cfg),
        init_state=lambda key: init_state(key, cfg),
        unroll=lambda params, state, data: unroll(params, state, data, **unroll_kwargs),
        config=cfg,
    )
