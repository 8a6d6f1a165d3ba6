"""The online episode: `unroll(params, state, data) -> (state, outputs)`.

One data point per step (sec. 3.2). With the default "delayed_error" protocol,
step t feeds x_t on slot `input_slot` of layer 0's forward message and the
error e_{t-1} of the previous prediction on slot `error_slot` of the last
layer's backward message, runs every layer for `micro_ticks` ticks, reads the
logits from slot `output_slot` of the last layer's outgoing forward message and
computes e_t = softmax(logits) - y_t for the next step. No gradient is computed:
learning happens in the forward dynamics alone.

Everything here is a pure function of arrays: it works under `jax.jit`,
`jax.vmap` (a batch of episodes, or a population of params) and `jax.grad`
(BPTT through the whole episode, optionally rematerialised).
"""
from __future__ import annotations

import math
import types
from typing import Optional, Sequence, Tuple, Union

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
from flax import struct

from vsml_jax import grid
from vsml_jax.config import VSMLConfig
from vsml_jax.params import VSMLParams
from vsml_jax.state import LayerState, VSMLState


@struct.dataclass
class StepOutput:
    """Per-step outputs; `unroll` stacks them on a leading time axis [T, ...].

    logits [C] (predicted before y_t is seen), loss [] (softmax cross-entropy),
    correct [] (1.0 if argmax logits == argmax y_t and every logit is finite,
    else 0.0; see `correct_from_logits`).
    """
    logits: jax.Array
    loss: jax.Array
    correct: jax.Array


def correct_from_logits(logits: jax.Array, labels: jax.Array,
                        dtype: Optional[jnp.dtype] = None) -> jax.Array:
    """Whether each prediction is right: logits [..., C], one-hot labels [..., C] -> [...].

    1 where argmax logits == argmax labels *and* every logit of that row is
    finite, else 0 (in `dtype`, default the logits' dtype). The one place every
    learner's `StepOutput.correct` comes from.
    """
    # argmax treats NaN as the largest value, so a NaN row would be "class 0"
    # (the first NaN): a diverged learner would score 1/C instead of 0.
    hit = jnp.argmax(logits, axis=-1) == jnp.argmax(labels, axis=-1)
    hit = hit & jnp.all(jnp.isfinite(logits), axis=-1)
    return hit.astype(logits.dtype if dtype is None else dtype)


def _kernel(impl: str) -> types.ModuleType:
    if impl == "fast":
        return grid
    if impl == "pallas":
        from vsml_jax import pallas_grid  # imported lazily: opt-in (Pallas)
        return pallas_grid
    if impl == "reference":
        from vsml_jax import reference  # imported lazily: only tests/benchmarks use it
        return reference
    raise ValueError(f"impl={impl!r} is unknown; use 'fast', 'pallas' or 'reference'.")


def input_message(cfg: VSMLConfig, x: jax.Array, step=0) -> jax.Array:
    """[A, m] forward message of layer 0: x_a on `input_slot`, the clock
    (step x clock_scale, for every a) on `clock_slot` if there is one, zeros
    elsewhere. step: examples seen before x (`VSMLState.step`)."""
    slots = {cfg.input_slot: x}
    if cfg.clock_slot >= 0:
        clock = jnp.asarray(step, jnp.float32) * cfg.clock_scale
        slots[cfg.clock_slot] = jnp.full(x.shape, clock, x.dtype)
    return _slot_message(cfg.msg_size, slots)


def error_message(cfg: VSMLConfig, error: jax.Array, label: jax.Array) -> jax.Array:
    """[C, m] backward message of the last layer: e_b (and y_b if feed_label)."""
    slots = {cfg.error_slot: error}
    if cfg.feed_label:
        slots[cfg.label_slot] = label
    return _slot_message(cfg.msg_size, slots)


def _slot_message(m: int, slots: dict) -> jax.Array:
    """[N, m] message with column k = slots[k] ([N]) and zeros elsewhere.

    Built as a stack of columns (not a scatter into zeros): the compiler sees
    which columns are zero and a column read back is the vector itself.
    """
    v = next(iter(slots.values()))
    zero = jnp.zeros_like(v)
    return jnp.stack([slots.get(k, zero) for k in range(m)], axis=1)


def _keep_slot(msg: jax.Array, slot: int) -> jax.Array:
    """msg [N, m] with every entry but column `slot` set to zero."""
    return jnp.zeros_like(msg).at[:, slot].set(msg[:, slot])


def readout(cfg: VSMLConfig, out_msg: jax.Array) -> jax.Array:
    """[C] logits from the last layer's forward messages [C, m]."""
    value = out_msg[:, cfg.output_slot]
    if cfg.readout_tanh:
        value = jnp.tanh(value)
    return cfg.readout_scale * value


def forward_pass(params: VSMLParams, layers: Tuple[LayerState, ...], x: jax.Array,
                 err_msg: jax.Array, impl: str = "fast", step=0
                 ) -> Tuple[Tuple[LayerState, ...], jax.Array]:
    """Ticks every layer once through the stack on input x [A0] and error message.
    step: the clock's step count (`input_message`; unused without a clock).

    Backward messages between layers come from the states *before* this pass
    (they travel one data point behind, like the error itself); forward
    messages flow through the stack within the pass.

    Returns: (new layer states, logits [C]).
    Raises ValueError if x, err_msg [C, m] or the layers do not fit the config.
    """
    cfg = params.cfg
    _check_input_vector(cfg, x, "forward_pass")
    if err_msg.shape != (cfg.num_classes, cfg.msg_size):
        raise ValueError(
            f"forward_pass: err_msg has shape {err_msg.shape}; expected "
            f"[{cfg.num_classes}, {cfg.msg_size}] (classes, msg_size), as built by "
            "error_message(cfg, error [C], label [C]).")
    _check_layers(cfg, layers, "forward_pass")
    return _forward(params, layers, x, err_msg, impl, top_error=False, step=step)


def _forward(params: VSMLParams, layers, x: jax.Array, err_msg: jax.Array, impl: str,
             top_error: bool, step=0):
    """`forward_pass` without the checks; top_error: err_msg is an `error_message`."""
    L = params.cfg.num_layers
    bwd_ins = [_backward_input(params, layers, l, impl) for l in range(L - 1)] + [err_msg]
    layers, logits, _ = _bottom_up(params, layers, x, bwd_ins, impl, top_error, step)
    return layers, logits


def predict_pass(params: VSMLParams, layers: Tuple[LayerState, ...], x: jax.Array,
                 impl: str = "fast", step=0) -> Tuple[Tuple[LayerState, ...], jax.Array]:
    """The no-error tick the predict_then_* protocols predict with: x [A0].
    step: the clock's step count (`input_message`; unused without a clock).

    No error at the top; under "predict_then_backprop" no layer reads a
    backward message either (the error sweep comes afterwards), otherwise the
    lower layers read the messages of the layers above as in `forward_pass`.
    Returns (new layer states, logits [C]).
    Raises ValueError if x is not [A0] or the layers do not fit the config
    (e.g. 784-wide images on a layer_sizes=(49, ...) learner).
    """
    _check_input_vector(params.cfg, x, "predict_pass")
    _check_layers(params.cfg, layers, "predict_pass")
    layers, logits, _ = _predict_tick(params, layers, x, impl, step)
    return layers, logits


def _predict_tick(params: VSMLParams, layers, x: jax.Array, impl: str, step=0):
    """`predict_pass`, also returning the forward input each layer read."""
    cfg = params.cfg
    zeros = jnp.zeros((cfg.num_classes,), x.dtype)
    if cfg.protocol == "predict_then_backprop":
        lower = [jnp.zeros((n, cfg.msg_size), x.dtype) for n in cfg.layer_sizes[1:-1]]
    else:
        lower = [_backward_input(params, layers, l, impl) for l in range(cfg.num_layers - 1)]
    return _bottom_up(params, layers, x, lower + [error_message(cfg, zeros, zeros)], impl,
                      top_error=True, step=step)


def _ticks(impl: str, params: VSMLParams, layers, l: int, fwd_in, bwd_in, top_error: bool):
    """layer_ticks of layer l; the fast kernels are told which message slots can be
    non-zero (layer 0's input and the top's error message use one or two of the
    m slots, as do all messages with slot_messages), so they skip the others.

    top_error: bwd_in is the top layer's `error_message`.
    """
    cfg = params.cfg
    if impl == "reference":
        return _kernel(impl).layer_ticks(params.layer(l), cfg, layers[l], fwd_in, bwd_in, l)
    fwd_slots, bwd_slots = _slots(cfg, l, top_error)
    return _kernel(impl).layer_ticks(params.layer(l), cfg, layers[l], fwd_in, bwd_in, l,
                                     fwd_slots=fwd_slots, bwd_slots=bwd_slots)


def _slots(cfg: VSMLConfig, l: int, top_error: bool):
    """(fwd_slots, bwd_slots): the message columns layer l reads that can be non-zero."""
    clock = (cfg.clock_slot,) if l == 0 and cfg.clock_slot >= 0 else ()
    fwd_slots = (cfg.input_slot,) + clock if l == 0 or cfg.slot_messages else None
    if top_error:
        bwd_slots = (cfg.error_slot,) + ((cfg.label_slot,) if cfg.feed_label else ())
    else:
        bwd_slots = (cfg.error_slot,) if cfg.slot_messages else None
    return fwd_slots, bwd_slots


def _backward_input(params: VSMLParams, layers, l: int, impl: str) -> jax.Array:
    """[B_l, m]: what layer l reads from layer l+1's backward messages."""
    cfg = params.cfg
    msg = _kernel(impl).backward_messages(params.layer(l + 1), cfg, layers[l + 1])
    return _keep_slot(msg, cfg.error_slot) if cfg.slot_messages else msg


def _bottom_up(params: VSMLParams, layers, x: jax.Array, bwd_ins, impl: str,
               top_error: bool, step=0):
    """One tick of every layer, bottom to top, with the given backward inputs.

    top_error: bwd_ins[-1] is an `error_message` (only its error/label slots set).
    step: the clock's step count (`input_message`).

    Returns (new layer states, logits [C], the forward input each layer read).
    """
    cfg, k = params.cfg, _kernel(impl)
    fwd_in, fwd_ins, new_layers = input_message(cfg, x, step), [], []
    for l in range(cfg.num_layers):
        p = params.layer(l)
        fwd_ins.append(fwd_in)
        top = top_error and l == cfg.num_layers - 1
        if impl == "pallas":
            # The ticks and the forward messages in one kernel (pallas_grid.layer_step).
            s, fwd_in = k.layer_step(p, cfg, layers[l], fwd_in, bwd_ins[l], l,
                                     *_slots(cfg, l, top))
        else:
            s = _ticks(impl, params, layers, l, fwd_in, bwd_ins[l], top)
            fwd_in = k.forward_messages(p, cfg, s)
        if cfg.slot_messages and l < cfg.num_layers - 1:
            fwd_in = _slot_message(cfg.msg_size, {
                cfg.input_slot: cfg.readout_scale * fwd_in[:, cfg.output_slot]})
        new_layers.append(s)
    return tuple(new_layers), readout(cfg, fwd_in), fwd_ins


def _top_down(params: VSMLParams, layers, fwd_ins, err_msg: jax.Array, impl: str):
    """The learn sweep of "predict_then_backprop": one tick per layer, top first.

    Layer l reads the forward input of its predict tick (fwd_ins[l]) and the
    backward message layer l+1 sends *after* its own learn tick (the error
    e_t at the top), so e_t reaches every layer within one step, as the
    backward pass of backprop does. Returns the new layer states.
    """
    cfg = params.cfg
    layers, bwd = list(layers), err_msg
    for l in reversed(range(cfg.num_layers)):
        layers[l] = _ticks(impl, params, layers, l, fwd_ins[l], bwd, l == cfg.num_layers - 1)
        if l > 0:
            bwd = _backward_input(params, layers, l - 1, impl)
    return tuple(layers)


# Up to this many classes the softmax, loss and argmax of a step are written
# out per class (elementwise max, exp, sums and comparisons over the C
# columns) on GPU: they fuse into one or two kernels per time step, where
# `jax.nn.log_softmax`, `jnp.sum` and `jnp.argmax` over a [C] axis are a
# kernel each. The TPU compiler fuses the columns worse (more bytes moved per
# step, measured with its cost analysis), and on CPU nothing is gained, so
# both keep the library form. Same formulas; sums may differ in the last bit
# (summation order).
_UNROLLED_CLASSES = 16


def _argmax_columns(cols) -> jax.Array:
    """jnp.argmax over C columns [...] each: the first index of the largest."""
    best, idx = cols[0], jnp.zeros(cols[0].shape, jnp.int32)
    for k, col in enumerate(cols[1:], 1):
        better = col > best
        best, idx = jnp.where(better, col, best), jnp.where(better, k, idx)
    return idx


def _outputs_library(logits: jax.Array, y: jax.Array):
    """(log-probabilities [..., C], loss [...], correct [...]) with jax.nn / jnp."""
    logp = jax.nn.log_softmax(logits)
    return logp, -jnp.sum(y * logp, axis=-1), correct_from_logits(logits, y)


def _outputs_unrolled(logits: jax.Array, y: jax.Array):
    """`_outputs_library` written out over the C columns (elementwise ops only)."""
    C = logits.shape[-1]
    cols = [logits[..., k] for k in range(C)]
    ys = [y[..., k] for k in range(C)]
    top = cols[0]
    for col in cols[1:]:
        top = jnp.maximum(top, col)
    top = jax.lax.stop_gradient(top)  # as in jax.nn.log_softmax
    total = jnp.exp(cols[0] - top)
    for col in cols[1:]:
        total = total + jnp.exp(col - top)
    logp = logits - top[..., None] - jnp.log(total)[..., None]
    loss = -(ys[0] * logp[..., 0])
    for k in range(1, C):
        loss = loss - ys[k] * logp[..., k]
    finite = jnp.isfinite(cols[0])
    for col in cols[1:]:
        finite = finite & jnp.isfinite(col)
    hit = (_argmax_columns(cols) == _argmax_columns(ys)) & finite
    return logp, loss, hit.astype(logits.dtype)


def _outputs(cfg: VSMLConfig, logits: jax.Array, y: jax.Array
             ) -> Tuple[jax.Array, StepOutput]:
    """(e_t [..., C], StepOutput) of the prediction logits [..., C] for one-hot y.

    e_t = error_scale * (softmax(logits) - y) = error_scale * d CE / d logits
    is what the next step feeds back; loss and correct as in StepOutput.
    """
    if logits.shape[-1] > _UNROLLED_CLASSES:
        logp, loss, correct = _outputs_library(logits, y)
    else:
        logp, loss, correct = jax.lax.platform_dependent(
            logits, y, cuda=_outputs_unrolled, rocm=_outputs_unrolled,
            default=_outputs_library)
    error = cfg.error_scale * (jnp.exp(logp) - y)
    return error, StepOutput(logits=logits, loss=loss, correct=correct)


def step(params: VSMLParams, state: VSMLState, x: jax.Array, y: jax.Array,
         impl: str = "fast") -> Tuple[VSMLState, StepOutput]:
    """One online step on one example: x [A0], y one-hot [C]."""
    cfg = params.cfg
    _check_input_vector(cfg, x, "step")
    if y.shape != (cfg.num_classes,):
        raise ValueError(f"step: y has shape {y.shape}; expected one-hot "
                         f"[{cfg.num_classes}] (layer_sizes[-1] classes).")
    _check_layers(cfg, state.layers, "step")
    return _step(params, state, x, y, impl)


def _step(params: VSMLParams, state: VSMLState, x: jax.Array, y: jax.Array,
          impl: str) -> Tuple[VSMLState, StepOutput]:
    """`step` without the checks (`unroll` checks the whole episode once)."""
    cfg = params.cfg
    t = state.step
    if cfg.protocol == "delayed_error":
        err_msg = error_message(cfg, state.error, state.label)
        layers, logits = _forward(params, state.layers, x, err_msg, impl, top_error=True,
                                  step=t)
        error, out = _outputs(cfg, logits, y)
    else:  # predict_then_*: predict with no feedback, then learn from e_t.
        layers, logits, fwd_ins = _predict_tick(params, state.layers, x, impl, t)
        error, out = _outputs(cfg, logits, y)
        err_msg = error_message(cfg, error, y)
        if cfg.protocol == "predict_then_learn":
            layers, _ = _forward(params, layers, x, err_msg, impl, top_error=True, step=t)
        else:
            # predict_then_backprop: after the no-error tick, the learn sweep
            # from the top (_top_down). Every layer ticks twice per example,
            # (x, 0) then (x, e), which is what a cloned cell was trained on.
            layers = _top_down(params, layers, fwd_ins, err_msg, impl)
    return VSMLState(layers=layers, error=error, label=y.astype(error.dtype),
                     step=t + 1), out


def _batch_averaged_step(params, state, x, y, impl):
    """K parallel copies of one network, states averaged after every step.

    This is the paper's analogue of mini-batching (sec. 3.1, appendix C): x [K, A0],
    y [K, C], state leaves with a leading axis [K] (kept identical across K).
    """
    new_state, out = jax.vmap(lambda s, xi, yi: _step(params, s, xi, yi, impl))(
        state, x, y)
    avg = lambda a: jnp.broadcast_to(jnp.mean(a, axis=0, keepdims=True), a.shape)
    layers = tuple(LayerState(h=avg(s.h), c=avg(s.c)) for s in new_state.layers)
    return new_state.replace(layers=layers), out


def _layer_problems(cfg: VSMLConfig, layers, lead: Tuple[int, ...]) -> list:
    """What is wrong with the shapes of V_L's cell states (leaves [*lead, A, B, H])."""
    if not isinstance(layers, (tuple, list)):
        return [f"layers is a {type(layers).__name__}, expected a tuple of "
                f"{cfg.num_layers} LayerState"]
    if len(layers) != cfg.num_layers:
        return [f"{len(layers)} layers instead of {cfg.num_layers}"]
    sizes, H = cfg.layer_sizes, cfg.hidden_size
    H_c = H if cfg.cell == "lstm" else 0
    problems = []
    for l, layer in enumerate(layers):
        for name, want in (("h", lead + (sizes[l], sizes[l + 1], H)),
                           ("c", lead + (sizes[l], sizes[l + 1], H_c))):
            got = getattr(layer, name).shape
            if got != want:
                problems.append(f"layers[{l}].{name} has shape {got}, expected {want}")
    return problems


def _config_summary(cfg: VSMLConfig) -> str:
    return (f"layer_sizes={cfg.layer_sizes}, cell={cfg.cell!r}, "
            f"hidden_size={cfg.hidden_size}, dtype={cfg.dtype!r}")


def _check_input_vector(cfg: VSMLConfig, x: jax.Array, who: str) -> None:
    """ValueError unless x is one input vector [A0] of the config's first layer."""
    A0 = cfg.input_size
    if x.ndim == 1 and x.shape[0] == A0:
        return
    if x.shape and x.shape[-1] != A0:
        raise ValueError(
            f"{who}: x has width {x.shape[-1]} but the config's first layer has {A0} "
            f"input neurons (layer_sizes={cfg.layer_sizes}); give x of shape [{A0}]: "
            "pool/reshape the data to that width (e.g. vsml_jax.data.pool_images for "
            "28x28 -> 7x7) or use a config with layer_sizes[0] equal to the data width.")
    raise ValueError(
        f"{who}: x has shape {x.shape}; expected one input vector [{A0}] "
        f"(layer_sizes={cfg.layer_sizes}). For N inputs use "
        "vsml_jax.learners.vsml_predict (or jax.vmap over them).")


def _check_layers(cfg: VSMLConfig, layers, who: str) -> None:
    """ValueError unless layers are one copy of V_L's cell states for the config."""
    problems = _layer_problems(cfg, layers, ())
    if not problems:
        return
    # Layers with one extra leading axis K that fit otherwise: a state broadcast
    # by init_state_for_streams, the likeliest mistake.
    lead = getattr(layers[0], "h", None) if isinstance(layers, (tuple, list)) and layers \
        else None
    streams = (lead is not None and lead.ndim == 4 and
               not _layer_problems(cfg, layers, lead.shape[:1]))
    hint = (" These are the layers of K batch-averaged streams (leading axis K, all "
            "copies equal): pass copy 0, jax.tree_util.tree_map(lambda a: a[0], "
            "state.layers)." if streams else
            " Pass state.layers of a state from init_state(key, cfg).")
    raise ValueError(f"{who}: layers do not match the config: " + "; ".join(problems[:3])
                     + f" ({_config_summary(cfg)})." + hint)


def _check_data(cfg: VSMLConfig, state: VSMLState, inputs, labels) -> None:
    if inputs.ndim not in (2, 3):
        raise ValueError(
            f"unroll: inputs have shape {inputs.shape}; expected [T, {cfg.input_size}] "
            f"(one episode) or [T, K, {cfg.input_size}] (K streams with averaged "
            "states). For a batch of independent episodes use jax.vmap(unroll).")
    if inputs.shape[-1] != cfg.input_size:
        raise ValueError(
            f"unroll: inputs have width {inputs.shape[-1]} but the config's first layer "
            f"has {cfg.input_size} input neurons (layer_sizes={cfg.layer_sizes}); "
            "reshape/pool the data or change layer_sizes[0].")
    expected = inputs.shape[:-1] + (cfg.num_classes,)
    if labels.shape != expected:
        raise ValueError(
            f"unroll: labels have shape {labels.shape}; expected one-hot labels of "
            f"shape {expected} (layer_sizes[-1]={cfg.num_classes} classes).")
    # Every leaf of V_L (all layers, h and c, error and label), not just the
    # first layer: a mismatch further down otherwise surfaces as a shape or
    # scan-carry TypeError deep inside the step.
    lead = () if inputs.ndim == 2 else (inputs.shape[1],)
    # canonicalize: float64 means float32 unless x64 is enabled, as in init_state.
    dtype = jax.dtypes.canonicalize_dtype(cfg.dtype)
    got = {"error": state.error, "label": state.label}
    if isinstance(state.layers, (tuple, list)):
        for l, layer in enumerate(state.layers):
            got[f"layers[{l}].h"], got[f"layers[{l}].c"] = layer.h, layer.c
    problems = [f"{k} has shape {got[k].shape}, expected {lead + (cfg.num_classes,)}"
                for k in ("error", "label") if got[k].shape != lead + (cfg.num_classes,)]
    problems += _layer_problems(cfg, state.layers, lead)
    problems += [f"{k} has dtype {v.dtype}, expected {dtype}" for k, v in got.items()
                 if v.dtype != dtype]
    if problems:
        raise ValueError(
            "unroll: state does not match the config: " + "; ".join(problems[:3])
            + f" ({_config_summary(cfg)}). Create it with init_state(key, cfg)"
            + ("" if inputs.ndim == 2 else
               " and broadcast it to the K streams (see init_state_for_streams)") + ".")


def unroll(params: VSMLParams, state: VSMLState,
           data: Tuple[jax.Array, jax.Array], *, impl: str = "fast",
           remat: bool = False,
           remat_chunk: Union[None, int, Sequence[int]] = None
           ) -> Tuple[VSMLState, StepOutput]:
    """Runs an online episode through the VS Meta RNN.

    Args:
      params: V_M (with its config).
      state: V_L from `init_state` (leaves [K, ...] for averaged streams).
      data: (inputs [T, A0], labels one-hot [T, C]) for one stream, or
        (inputs [T, K, A0], labels [T, K, C]) for K streams of one network whose
        states are averaged after every step (the paper's batching).
      impl: "fast" (the algebraically rewritten kernels), "pallas" (the same
        with the LSTM micro ticks fused into one Pallas kernel each way, opt-in
        for TPU/GPU, see `vsml_jax.pallas_grid`) or "reference" (a plain
        per-cell vmap, for tests and benchmarks).
      remat: rematerialise each step in the backward pass (memory O(T x |V_L|)
        carries instead of all residuals).
      remat_chunk: chunked remat: store carries only every `remat_chunk`
        steps (T must be a multiple); memory ~ (T / chunk + chunk) carries.
        A tuple nests the chunks for long episodes (see `remat_chunks`).
    Returns:
      (final state, StepOutput with leaves stacked over time: logits [T, (K,) C],
      loss [T, (K)], correct [T, (K)]).
    """
    inputs, labels = data
    cfg = params.cfg
    _check_data(cfg, state, inputs, labels)
    dtype = jnp.dtype(cfg.dtype)
    inputs, labels = inputs.astype(dtype), labels.astype(dtype)
    step_fn = _batch_averaged_step if inputs.ndim == 3 else _step
    if impl in ("fast", "pallas"):
        # The LSTM gate scaling once, before the loop (see grid.GateScaledParams).
        params = params.replace(cells=grid.gate_scaled(params.cells, cfg))
    # V_M enters the loop twice: as arrays to compute with and as one flat
    # vector that receives their gradient (see _flat_grad).
    flat = jax.flatten_util.ravel_pytree(params)[0]
    fixed = jax.lax.stop_gradient(params)

    def body(carry, xy):
        return step_fn(_flat_grad(fixed, flat), carry, xy[0], xy[1], impl)

    if remat or remat_chunk:
        body = jax.checkpoint(body)
    chunks = remat_chunks(remat_chunk, inputs.shape[0])
    return _nested_scan(body, state, (inputs, labels), chunks)


@jax.custom_vjp
def _flat_grad(params: VSMLParams, flat: jax.Array) -> VSMLParams:
    """params (V_M, stop_gradient'ed), with their gradient sent to `flat` instead.

    flat [P] is `ravel_pytree(params)`. Used inside the time loop: the forward
    reads the parameter arrays as they are (no slicing of a flat vector every
    step), and the backward loop accumulates the gradient of all of V_M in one
    array, i.e. one add per step instead of one per parameter array. The
    gradient is the same.
    """
    return params


def _flat_grad_fwd(params, flat):
    return params, None


def _flat_grad_bwd(_, ct):
    return jax.tree_util.tree_map(jnp.zeros_like, ct), jax.flatten_util.ravel_pytree(ct)[0]


_flat_grad.defvjp(_flat_grad_fwd, _flat_grad_bwd)


def remat_chunks(remat_chunk: Union[None, int, Sequence[int]], T: int) -> Tuple[int, ...]:
    """Validated chunk sizes of nested remat, innermost first (() = none).

    remat_chunk=k stores carries every k steps (memory ~ T/k + k carries,
    one extra forward pass); (k1, k2, ...) nests the chunks: the innermost
    chunks of k1 steps are grouped k2 at a time, and so on (memory ~ T/(k1 k2)
    + k2 + k1 carries for two levels, one more forward pass per level). Their
    product must divide T.
    """
    if not remat_chunk:
        return ()
    chunks = (remat_chunk,) if isinstance(remat_chunk, int) else tuple(remat_chunk)
    if any(int(k) < 1 for k in chunks) or T % math.prod(chunks):
        what = f"remat_chunk={remat_chunk}" if len(chunks) == 1 else (
            f"the product of remat_chunk={tuple(chunks)} ({math.prod(chunks)})")
        raise ValueError(f"unroll: {what} must divide the episode length T={T} "
                         "(chunks >= 1).")
    return tuple(int(k) for k in chunks)


def _nested_scan(body, carry, xs, chunks: Tuple[int, ...]):
    """`lax.scan(body, carry, xs)` with a jax.checkpoint around each chunk level.

    Same result as the plain scan; only what the backward pass stores changes.
    xs leaves are [T, ...]; outputs are stacked over T as by scan.
    """
    if not chunks:
        return jax.lax.scan(body, carry, xs)
    k, T = chunks[0], jax.tree_util.tree_leaves(xs)[0].shape[0]
    grouped = jax.tree_util.tree_map(lambda a: a.reshape((T // k, k) + a.shape[1:]), xs)

    @jax.checkpoint
    def chunk_body(c, x_chunk):
        return jax.lax.scan(body, c, x_chunk)

    carry, out = _nested_scan(chunk_body, carry, grouped, chunks[1:])
    return carry, jax.tree_util.tree_map(lambda a: a.reshape((T,) + a.shape[2:]), out)


def init_state_for_streams(state: VSMLState, num_streams: int) -> VSMLState:
    """Broadcasts one V_L to K identical copies for a batch-averaged `unroll`."""
    return jax.tree_util.tree_map(
        lambda a: jnp.broadcast_to(a, (num_streams,) + a.shape), state)


def meta_loss(params: VSMLParams, state: VSMLState, data, **unroll_kwargs) -> jax.Array:
    """Mean online cross-entropy of an episode (the sec. 3.2 meta-objective)."""
    _, out = unroll(params, state, data, **unroll_kwargs)
    return jnp.mean(out.loss)
