"""The Meta RNN of Hochreiter et al. (2001): one LSTM that learns in its activations.

At step t a single LSTM reads [x_t, f_{t-1}], where the feedback f_{t-1} is the
error e_{t-1} = softmax(y^_{t-1}) - y_{t-1} of its previous prediction (the
signal a VS-ML learner gets) or the previous one-hot label y_{t-1}, and a
linear read-out of its hidden vector predicts y_t. Its meta variables V_M are
the LSTM and read-out weights, O(H (D + C + H)); its learned variables V_L
are the O(H) activations. The paper (sec. 2, fig. 6) contrasts this
|V_L| << |V_M| with VS-ML's |V_L| >> |V_M|.

    learner = meta_rnn_learner(num_inputs=49, num_classes=10, hidden_size=64)
    params = learner.init_params(key)          # {"w_x", "w_h", "b", "w_out", "b_out"}
    state = learner.init_state(key)            # MetaRNNState (zeros)
    state, out = learner.unroll(params, state, (inputs [T, D], labels [T, C]))

`unroll` is pure: jit, vmap (episodes or params) and grad (BPTT) all apply.
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

FEEDBACKS = ("error", "label", "both")


@dataclasses.dataclass(frozen=True)
class MetaRNNConfig:
    """Attributes:
      num_inputs: D.
      num_classes: C.
      hidden_size: H, LSTM width.
      feedback: what the LSTM sees of the previous step: "error" (e_{t-1},
        like VS-ML), "label" (y_{t-1}, as in Hochreiter et al. 2001) or "both".
    """
    num_inputs: int
    num_classes: int = 10
    hidden_size: int = 64
    feedback: str = "error"

    def __post_init__(self):
        if self.num_inputs < 1 or self.num_classes < 2 or self.hidden_size < 1:
            raise ValueError(
                f"MetaRNNConfig: num_inputs={self.num_inputs}, num_classes="
                f"{self.num_classes}, hidden_size={self.hidden_size} must be >= 1, >= 2, >= 1.")
        if self.feedback not in FEEDBACKS:
            raise ValueError(f"MetaRNNConfig: feedback={self.feedback!r} is unknown; use "
                             f"one of {FEEDBACKS}.")

    @property
    def feedback_size(self) -> int:
        return self.num_classes * (2 if self.feedback == "both" else 1)

    @property
    def input_size(self) -> int:
        return self.num_inputs


@struct.dataclass
class MetaRNNState:
    """V_L: LSTM carry (c [H], h [H]) and the feedback f_{t-1} [C or 2C]."""
    carry: Tuple[jax.Array, jax.Array]
    feedback: jax.Array


def init_state(cfg: MetaRNNConfig) -> MetaRNNState:
    """The empty memory every episode starts from (the key is not needed)."""
    zeros = jnp.zeros((cfg.hidden_size,), jnp.float32)
    return MetaRNNState(carry=(zeros, zeros),
                        feedback=jnp.zeros((cfg.feedback_size,), jnp.float32))


def init_params(key: jax.Array, cfg: MetaRNNConfig) -> Dict[str, jax.Array]:
    """V_M of the LSTM (gate order i, f, g, o) and its linear read-out.

    Returns {"w_x" [D + F, 4H], "w_h" [H, 4H], "b" [4H], "w_out" [H, C],
    "b_out" [C]} with F the feedback width. Weights are N(0, 1 / fan_in), biases
    zero except a forget-gate bias of 1 (the usual LSTM choice for keeping memory).
    """
    H, C, n_in = cfg.hidden_size, cfg.num_classes, cfg.num_inputs + cfg.feedback_size
    k_x, k_h, k_o = jax.random.split(key, 3)

    def normal(k, rows, cols):
        # A flat draw, reshaped: the same numbers as a [rows, cols] draw, but XLA
        # on CPU compiles it several times faster.
        w = jax.random.normal(k, (rows * cols,), jnp.float32).reshape(rows, cols)
        return w / np.sqrt(rows)

    return {"w_x": normal(k_x, n_in, 4 * H), "w_h": normal(k_h, H, 4 * H),
            "b": jnp.zeros((4 * H,), jnp.float32).at[H:2 * H].set(1.0),
            "w_out": normal(k_o, H, C), "b_out": jnp.zeros((C,), jnp.float32)}


def lstm_step(params: Dict[str, jax.Array], carry: Tuple[jax.Array, jax.Array],
              inputs: jax.Array) -> Tuple[Tuple[jax.Array, jax.Array], jax.Array]:
    """One LSTM step and read-out: ((c [H], h [H]), inputs [D + F]) -> (carry, logits [C])."""
    c, h = carry
    z = inputs @ params["w_x"] + h @ params["w_h"] + params["b"]
    i, f, g, o = jnp.split(z, 4)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (c, h), h @ params["w_out"] + params["b_out"]


def _feedback(cfg: MetaRNNConfig, logits: jax.Array, y: jax.Array) -> jax.Array:
    error = jax.nn.softmax(logits) - y
    if cfg.feedback == "error":
        return error
    if cfg.feedback == "label":
        return y
    return jnp.concatenate([error, y])


def unroll(cfg: MetaRNNConfig, params: Any, state: MetaRNNState,
           data: Tuple[jax.Array, jax.Array]) -> Tuple[MetaRNNState, StepOutput]:
    """Runs the Meta RNN over a stream (inputs [T, D], one-hot labels [T, C]).

    Returns (final state, StepOutput with logits [T, C], loss [T], correct [T]);
    the prediction of y_t uses x_t and feedback up to step t-1 only.
    """
    inputs, labels = data
    check_stream("Meta RNN", inputs, labels, cfg.num_inputs, cfg.num_classes,
                 note=" (one stream; use jax.vmap for several; batch-averaged streams "
                      "[T, K, D] are not defined for a Meta RNN)")

    def body(state, xy):
        x, y = xy
        carry, logits = lstm_step(params, state.carry, jnp.concatenate([x, state.feedback]))
        loss = optax.softmax_cross_entropy(logits, y)
        correct = correct_from_logits(logits, y, jnp.float32)
        new_state = MetaRNNState(carry=carry, feedback=_feedback(cfg, logits, y))
        return new_state, StepOutput(logits=logits, loss=loss, correct=correct)

    return jax.lax.scan(body, state, (inputs.astype(jnp.float32), labels.astype(jnp.float32)))


def predict(cfg: MetaRNNConfig, params: Any, state: MetaRNNState,
            inputs: jax.Array) -> jax.Array:
    """Logits [N, C] for held-out inputs [N, D], the state unchanged.

    Each x gets the read-out of one LSTM step from the current carry and
    feedback (exactly the prediction `unroll` would make for x next); the new
    carry is discarded, so the test inputs leave no trace.
    """
    check_inputs("Meta RNN predict", inputs, cfg.num_inputs)
    one = lambda x: lstm_step(params, state.carry, jnp.concatenate([x, state.feedback]))[1]
    return jax.vmap(one)(inputs.astype(jnp.float32))


def learner_from_config(cfg: MetaRNNConfig) -> Learner:
    """The Learner for a `MetaRNNConfig` (name "meta_rnn")."""
    return Learner(name="meta_rnn",
                   init_params=lambda key: init_params(key, cfg),
                   init_state=lambda key: init_state(cfg),
                   unroll=lambda params, state, data: unroll(cfg, params, state, data),
                   config=cfg,
                   predict=lambda params, state, inputs: predict(cfg, params, state, inputs))


def meta_rnn_learner(num_inputs: int, num_classes: int = 10, hidden_size: int = 64,
                     feedback: str = "error") -> Learner:
    """A Hochreiter et al. (2001) Meta RNN as a Learner (see `MetaRNNConfig`)."""
    return learner_from_config(MetaRNNConfig(num_inputs=num_inputs, num_classes=num_classes,
                                             hidden_size=hidden_size, feedback=feedback))


def count_params(cfg: MetaRNNConfig) -> int:
    """|V_M| of the Meta RNN: 4H(D + F + H) + 4H LSTM weights + (H + 1)C read-out
    (F = C, or 2C for feedback="both")."""
    shapes = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))


def count_learned_variables(cfg: MetaRNNConfig) -> int:
    """|V_L| of the Meta RNN: its c and h vectors (2H)."""
    return 2 * cfg.hidden_size
