"""A learned local learning rule (LLR / fast-weight view, paper eq. 9-12).

One linear layer with explicit weights w [D + 1, C] (the last input is a
constant 1, so the biases are ordinary weights) computes the logits

    x_b = sum_a x_a w_ab                                  (eq. 9, no squashing:
                                                           the logits feed a softmax)

and after each prediction every weight is changed by the same tiny MLP f_theta
(the learning rule, eq. 10-11):

    w_ab <- w_ab + f_theta(x_a, x_b, w_ab, e_b),   e = softmax(x) - y.

The meta variables are theta only (a few dozen numbers, independent of D and
C); the learned variables are the weights. This is the special case of VS-ML
that the paper maps onto a VS Meta RNN in eq. 12, kept here as a baseline.

    learner = hebbian_learner(num_inputs=49, num_classes=10)
    state, out = learner.unroll(learner.init_params(k1), learner.init_state(k2), data)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from vsml_jax.learners import Learner, check_inputs, check_stream
from vsml_jax.network import StepOutput, correct_from_logits

NUM_FEATURES = 4  # x_a, x_b, w_ab, e_b


@dataclasses.dataclass(frozen=True)
class HebbianConfig:
    """Attributes:
      num_inputs: D.
      num_classes: C.
      rule_hidden: width of the rule MLP f_theta (4 -> rule_hidden -> 1).
      update_scale: Delta w = update_scale * tanh(MLP output); bounds a step.
      init_std: weights start N(0, init_std^2 / (D + 1)).
      weight_clip: clip weights to [-clip, clip] after each update (None: off).
    """
    num_inputs: int
    num_classes: int = 10
    rule_hidden: int = 16
    update_scale: float = 0.1
    init_std: float = 1.0
    weight_clip: float | None = 4.0

    def __post_init__(self):
        if self.num_inputs < 1 or self.num_classes < 2 or self.rule_hidden < 1:
            raise ValueError(
                f"HebbianConfig: num_inputs={self.num_inputs}, num_classes="
                f"{self.num_classes}, rule_hidden={self.rule_hidden} must be >= 1, >= 2, >= 1.")
        if self.weight_clip is not None and self.weight_clip <= 0:
            raise ValueError(f"HebbianConfig: weight_clip={self.weight_clip} must be > 0 "
                             "or None.")

    @property
    def input_size(self) -> int:
        return self.num_inputs


@struct.dataclass
class HebbianState:
    """V_L: the weights w [D + 1, C]."""
    w: jax.Array


def init_params(key: jax.Array, cfg: HebbianConfig) -> Dict[str, jax.Array]:
    """theta: {"w1" [4, R], "b1" [R], "w2" [R], "b2" []} with R = rule_hidden."""
    k1, k2 = jax.random.split(key)
    R = cfg.rule_hidden
    w1 = jax.random.normal(k1, (NUM_FEATURES * R,), jnp.float32).reshape(NUM_FEATURES, R)
    return {"w1": w1 / np.sqrt(NUM_FEATURES),
            "b1": jnp.zeros((R,), jnp.float32),
            "w2": jax.random.normal(k2, (R,), jnp.float32) / np.sqrt(R),
            "b2": jnp.zeros((), jnp.float32)}


def init_state(key: jax.Array, cfg: HebbianConfig) -> HebbianState:
    D, C = cfg.num_inputs + 1, cfg.num_classes
    # Flat draw, reshaped: the same numbers, but XLA on CPU compiles it several
    # times faster than a [D, C] draw.
    w = jax.random.normal(key, (D * C,), jnp.float32).reshape(D, C)
    return HebbianState(w=cfg.init_std / np.sqrt(D) * w)


def rule_update(cfg: HebbianConfig, theta: Dict[str, jax.Array], x: jax.Array,
                out: jax.Array, w: jax.Array, error: jax.Array) -> jax.Array:
    """Delta w [A, C] = f_theta(x_a, x_b, w_ab, e_b) for every weight at once.

    The first MLP layer is split by feature so the per-neuron terms are computed
    once per neuron ([A, R] and [C, R]) and only broadcast-added per weight.
    """
    w1 = theta["w1"]
    pre = (x[:, None, None] * w1[0]                       # [A, 1, R]
           + (out[:, None] * w1[1] + error[:, None] * w1[3])[None]  # [1, C, R]
           + w[..., None] * w1[2] + theta["b1"])         # [A, C, R]
    delta = jnp.tanh(pre) @ theta["w2"] + theta["b2"]
    return cfg.update_scale * jnp.tanh(delta)


def unroll(cfg: HebbianConfig, theta: Dict[str, jax.Array], state: HebbianState,
           data: Tuple[jax.Array, jax.Array]) -> Tuple[HebbianState, StepOutput]:
    """Predict with w, then apply the learned rule (inputs [T, D], labels [T, C])."""
    inputs, labels = data
    check_stream("Hebbian learner", inputs, labels, cfg.num_inputs, cfg.num_classes,
                 note=" (use jax.vmap for several streams)")

    def body(state, xy):
        x, y = xy
        x1 = jnp.concatenate([x, jnp.ones((1,), x.dtype)])
        logits = x1 @ state.w
        loss = optax.softmax_cross_entropy(logits, y)
        error = jax.nn.softmax(logits) - y
        w = state.w + rule_update(cfg, theta, x1, logits, state.w, error)
        if cfg.weight_clip is not None:
            w = jnp.clip(w, -cfg.weight_clip, cfg.weight_clip)
        correct = correct_from_logits(logits, y, jnp.float32)
        return HebbianState(w=w), StepOutput(logits=logits, loss=loss, correct=correct)

    return jax.lax.scan(body, state, (inputs.astype(jnp.float32), labels.astype(jnp.float32)))


def predict(cfg: HebbianConfig, state: HebbianState, inputs: jax.Array) -> jax.Array:
    """Logits [N, C] = [x, 1] w of the current weights for inputs [N, D]."""
    check_inputs("Hebbian predict", inputs, cfg.num_inputs)
    x = inputs.astype(jnp.float32)
    x1 = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)  # as in unroll
    return x1 @ state.w


def learner_from_config(cfg: HebbianConfig) -> Learner:
    """The Learner for a `HebbianConfig` (name "hebbian")."""
    return Learner(name="hebbian", init_params=lambda key: init_params(key, cfg),
                   init_state=lambda key: init_state(key, cfg),
                   unroll=lambda params, state, data: unroll(cfg, params, state, data),
                   config=cfg,
                   predict=lambda params, state, inputs: predict(cfg, state, inputs))


def hebbian_learner(num_inputs: int, num_classes: int = 10, **config_fields: Any) -> Learner:
    """A learned-local-rule learner (see `HebbianConfig` for the fields)."""
    return learner_from_config(HebbianConfig(num_inputs=num_inputs, num_classes=num_classes,
                                             **config_fields))
