"""A common interface for everything that learns online from a stream.

Meta-training, evaluation and the baselines all speak to a `Learner`:

    params = learner.init_params(key)            # meta variables (a pytree)
    state = learner.init_state(key)              # per-episode variables
    state, out = learner.unroll(params, state, (inputs [T, D], labels [T, C]))
    # out.logits [T, C], out.loss [T], out.correct [T]  (vsml_jax.StepOutput)
    logits = learner.predict(params, state, test_inputs [N, D])   # [N, C]

`unroll` must be pure (jit / vmap / grad), predict y_t before it is seen,
and learn only from what the stream has shown so far; `out.correct` comes from
`correct_from_logits` (0 wherever a logit is NaN or inf). Values are not
checked on the default path: run `vsml_jax.checks.check_stream_values` on the
host, or wrap an unroll with `vsml_jax.checks.checkify_unroll`.

`predict` (optional) classifies held-out inputs with the current state and
leaves it unchanged, so test accuracy can be measured at any point of a stream.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from vsml_jax import network
from vsml_jax.config import VSMLConfig
from vsml_jax.network import StepOutput, correct_from_logits, predict_pass, unroll
from vsml_jax.params import init_params
from vsml_jax.state import init_state

Unroll = Callable[[Any, Any, Tuple[jax.Array, jax.Array]], Tuple[Any, StepOutput]]
Predict = Callable[[Any, Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Learner:
    """An online learner: how to make its variables and how to run it.

    Attributes:
      name: short identifier used in logs, JSON and plots (e.g. "vsml").
      init_params: key -> meta variables (None for learners with none).
      init_state: key -> per-episode state.
      unroll: (params, state, data) -> (state, StepOutput), pure.
      config: the static description of the learner (for checkpoints and logs).
      predict: optional (params, state, inputs [N, D]) -> logits [N, C]: what
        the current state predicts for N held-out inputs, without learning
        from them (pure; the state is not returned). None if undefined.
    """
    name: str
    init_params: Callable[[jax.Array], Any]
    init_state: Callable[[jax.Array], Any]
    unroll: Unroll
    config: Any = None
    predict: Optional[Predict] = None


def check_stream(who: str, inputs: jax.Array, labels: jax.Array, num_inputs: int,
                 num_classes: int, *, minibatch: bool = False, note: str = "") -> None:
    """ValueError naming `who` unless inputs are [T, D] (or [T, K, D] with
    `minibatch`) and labels the matching one-hot [..., C]; `note` is appended to
    the inputs message (e.g. how to run several streams)."""
    if inputs.ndim not in ((2, 3) if minibatch else (2,)) or inputs.shape[-1] != num_inputs:
        shapes = f"[T, {num_inputs}]" + (f" or [T, K, {num_inputs}]" if minibatch else "")
        raise ValueError(f"{who}: inputs have shape {inputs.shape}; expected {shapes}{note}.")
    expected = inputs.shape[:-1] + (num_classes,)
    if labels.shape != expected:
        raise ValueError(f"{who}: labels have shape {labels.shape}; expected one-hot "
                         f"{expected}.")


def check_inputs(who: str, inputs: jax.Array, num_inputs: int) -> None:
    """ValueError naming `who` unless inputs are [N, num_inputs] (Learner.predict's
    held-out inputs); the message gives both widths and the fix."""
    if inputs.ndim == 2 and inputs.shape[-1] == num_inputs:
        return
    if inputs.ndim >= 1 and inputs.shape[-1] != num_inputs:
        raise ValueError(
            f"{who}: inputs have width {inputs.shape[-1]} but the learner takes "
            f"{num_inputs} inputs; give [N, {num_inputs}]: pool/reshape the data the "
            "way the training streams were (e.g. vsml_jax.data.pool_images) or build "
            f"the learner for {inputs.shape[-1]} inputs.")
    raise ValueError(f"{who}: inputs have shape {inputs.shape}; expected "
                     f"[N, {num_inputs}] (one row per held-out input).")


def vsml_learner(cfg: VSMLConfig, **unroll_kwargs) -> Learner:
    """The VS Meta RNN as a Learner (`unroll_kwargs` go to `vsml_jax.unroll`)."""
    impl = unroll_kwargs.get("impl", "fast")
    return Learner(
        name="vsml",
        init_params=lambda key: init_params(key, cfg),
        init_state=lambda key: init_state(key, cfg),
        unroll=lambda params, state, data: unroll(params, state, data, **unroll_kwargs),
        config=cfg,
        predict=lambda params, state, inputs: vsml_predict(params, state, inputs, impl),
    )


def vsml_predict(params, state, inputs: jax.Array, impl: str = "fast") -> jax.Array:
    """Logits [N, C] of a VS-ML state for held-out inputs [N, A0], state unchanged.

    Each input gets one `network.predict_pass` from the current cell states (no
    error): the prediction pass of the "predict_then_*" protocols
    (under "delayed_error" it is the step's prediction without the previous
    step's error, which belongs to the stream, not to the test image). A state
    with leading axis K (batch-averaged streams, `init_state_for_streams`)
    holds K identical copies; copy 0 predicts.
    """
    cfg = params.cfg
    check_inputs(f"vsml predict (layer_sizes={cfg.layer_sizes})", inputs, cfg.input_size)
    layers, step = state.layers, state.step
    if state.error.ndim == 2:  # [K, C]: K averaged copies, all equal
        layers, step = jax.tree_util.tree_map(lambda a: a[0], (layers, step))
    # predict_pass checks these too, but inside lax.map; here the message names us.
    network._check_layers(cfg, layers, "vsml predict")
    dtype = jnp.dtype(cfg.dtype)
    one = lambda x: predict_pass(params, layers, x, impl, step)[1]
    # One image at a time: vmapping over images multiplies the per-cell
    # [A, B, 4H] temporaries and runs several times slower on CPU.
    return jax.lax.map(one, inputs.astype(dtype))
