"""Learning algorithm cloning (sec. 3.1, appendix B): teach V_M to be backprop.

V_M is optimised by supervised learning on random data so that every LSTM cell
of a VS-ML layer

1. keeps a weight w and a bias b in its state,
2. computes y = tanh(x) w + b from its forward input x (eq. 13, the *forward*
   stage), and
3. on a backward input e applies the backprop update
   w <- w - lr e tanh(x), b <- b - lr e, and sends back
   e' = e w (1 - tanh(x)^2) (the *backprop* stage).

Conventions (fixed here so the clone runs unchanged in `vsml_jax.unroll`):

* Storage. w and b live in the LSTM context vector c of the cell, at slots
  ``W_SLOT = 0`` and ``B_SLOT = 1``, scaled down by the target scale s
  (appendix B: h is bounded in (-1, 1), so the network works with w / s and
  b / s). All other state entries start at zero. This is exactly the layout
  that `vsml_jax.init_state` makes with ``init_random_fraction = 1 / H``:
  c[0] = w / s is random (a random weight initialisation), everything else
  zero (b = 0). So a cloned learner needs no special initialisation code.
* Messages. x enters on slot ``input_slot`` of the forward message, e on slot
  ``error_slot`` of the backward message (both in true units). The cell emits
  y / s on slot ``output_slot`` of its forward message (C @ h) and e' (true
  units) on slot ``error_slot`` of its backward message (U @ h). With
  ``reduce="sum"`` and ``readout_scale=s`` the layer computes
  logits_b = sum_a (tanh(x_a) w_ab + b_ab) and the backward message
  e'_a = sum_b e_b w_ab (1 - tanh(x_a)^2), i.e. a tanh-input linear layer.
* Protocol. One training step of the network is the core's
  ``protocol="predict_then_learn"``: a *predict* pass (micro_ticks ticks on
  (x, e = 0)) whose forward message is the output, then a *learn* pass
  (micro_ticks ticks on (x, e)) after which the stored w, b must be updated and
  the backward message must carry e'. The cloning objective runs exactly these
  two passes with the core's fast kernels (`vsml_jax.grid`) on K independent
  1 x 1 grids (vmapped), so what is trained is what runs at meta-test.
* Learning rate. ``lr`` is the cloned rule's learning rate in true units; the
  update of the stored value is lr / s per unit of e tanh(x). The paper's
  "gradient update target norm 1e-3" is this stored step size lr / s
  (e.g. s = 20, lr = 0.02). At meta-test ``error_scale`` multiplies e and so
  rescales the effective learning rate without retraining (the rule is linear
  in e over the trained range |e| <= e_max).

Objective. From a cell state holding (w0, b0) the cell runs `steps`
consecutive (predict, learn) steps on random x ~ N(0, x_std^2) and errors e
(|e| <= e_max, spread over e_decades decades), the state carried throughout,
while the exact w_t, b_t are tracked analytically. Each step contributes
Smooth-L1 (Huber) terms on
  - the forward output y - (tanh(x_t) w_t + b_t)     (units of fwd_unit),
  - the stored w, b after the predict pass - (w_t, b_t)       (units of
    store_unit * lr),
  - the stored w, b after the learn pass - (w_t+1, b_t+1)     (same units),
  - the backward message e' - e_t w_t (1 - tanh(x_t)^2)       (fwd_unit).
Stored-weight errors are measured against the exact trajectory, so drift
accumulates in the loss and training removes it. The forward stage uses only
the first two terms (no learn pass). Training cells persist across
optimiser steps (`Chains`, `chain_batch`) so that states of every age are
trained, not only freshly written ones.

What the measurements say (see experiments.clone, fig4, fig5): a cell is
accurate once it has run one step; the first pass after a state is written
by hand (`encode_state`) is markedly less accurate. At meta-test every cell
starts from the all-zero state (w = b = 0), so only the first of thousands
of steps is affected.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, ClassVar, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from vsml_jax import reference
from vsml_jax.config import VSMLConfig
from vsml_jax.params import VSMLParams
from vsml_jax.state import LayerState

W_SLOT = 0  # c[W_SLOT] = w / s (the slot init_state randomises first)
B_SLOT = 1  # c[B_SLOT] = b / s
STAGES = ("forward", "backprop", "nearest_mean")
Q_SLOT = 1  # nearest_mean stage: c[Q_SLOT] = q = n / (n + 1), n the class count


@dataclasses.dataclass(frozen=True)
class CloneSpec:
    """What the cells are cloned to do, and on which random data.

    Attributes:
      target_scale: s; stored values and the forward message are true values / s.
      lr: learning rate of the cloned rule, in true units.
      x_std: std of the random forward inputs x ~ N(0, x_std^2).
      w_max: w ~ U(-w_max, w_max) at the start of a training unroll.
      b_max: b ~ U(-b_max, b_max).
      e_max: largest |e|; e = +-e_max * 10^(-u) with u ~ U(0, e_decades), so
        small errors (most of them late in learning) are trained as well.
      e_decades: decades spanned by |e| (0: |e| ~ U(0, e_max)).
      steps: consecutive steps per training unroll (state carried).
      fwd_unit: forward and backward-message residuals are divided by this
        (true units) before the Smooth-L1 loss; stored-weight residuals are
        divided by lr (one full-size update).
      store_unit: stored-weight residuals are divided by store_unit * lr: a
        clone must hold its weights far more precisely than one update, since
        a drift repeats at every one of 10^4 steps (and coherently in all cells
        that see the same input).
      x_repeat_prob: probability that a cell sees one x for the whole unroll
        (like a background pixel), so that drift under a constant input shows.
      bias_lr_scale: the cloned bias update is b <- b - bias_lr_scale lr e.
        1 is backprop for one cell. In a layer every cell (a, b) holds its own
        bias and the layer sums them over the A inputs, so the layer's bias
        moves A times faster than one cell's; 0 keeps b fixed (a layer
        without a learned bias).
      fwd_weight, store_weight, bwd_weight: weights of the loss terms.
      huber_delta: transition point of the Smooth-L1 loss (in those units).
      x_low, x_high: stage "nearest_mean": x ~ U(x_low, x_high) (the range of
        standardised pixels, see vsml_jax.data.images), or the cell's constant
        background value x_low with a per-cell probability ~ U(0, 1).
      label_prob_max: stage "nearest_mean": a cell's label y_b is 1 with a
        per-cell probability ~ U(0, label_prob_max) (its class's frequency).
      log_count_scale: stage "nearest_mean": how a cell stores its class
        count n. 0: q = n / (n + 1) itself; K > 0: log(n + 1) / K. With q, an
        error of 0.01 doubles the rule's step 1 - q = 1 / (n + 1) at n = 100,
        and the LSTM cannot form that step (a forget gate sigmoid(log n)) from
        q; with the log count an error of d changes the step by a factor
        exp(K d), whatever n, and the gate's pre-activation is linear in it.
      count_max: stage "nearest_mean": 0: a restarting training cell starts
        from the all-zero state (nothing seen). > 0: half of them start instead
        from a state holding a mean m ~ U(x_low, x_high) and a count n with
        log(1 + n) ~ U(0, log(1 + count_max)) (written into c; h = 0), so
        that counts in the hundreds are trained without unrolling that far.
      input_tanh: stage "nearest_mean": clone the nearest class mean of
        tanh(x) instead of x (the cell applies the squashing itself; see
        `nm_feature`).
    """
    target_scale: float = 20.0
    lr: float = 0.02
    x_std: float = 2.0
    w_max: float = 10.0
    b_max: float = 10.0
    e_max: float = 1.0
    e_decades: float = 0.0
    steps: int = 4
    fwd_unit: float = 1.0
    store_unit: float = 1.0
    x_repeat_prob: float = 0.0
    bias_lr_scale: float = 1.0
    fwd_weight: float = 1.0
    store_weight: float = 1.0
    bwd_weight: float = 1.0
    huber_delta: float = 1.0
    x_low: float = -0.43
    x_high: float = 2.83
    label_prob_max: float = 0.5
    log_count_scale: float = 0.0
    count_max: float = 0.0
    input_tanh: bool = False

    # Each field's allowed range as (low, high[, "> 0"]): inclusive bounds,
    # None for none, a third entry for "strictly positive"; non-finite values
    # are always refused. vsml_jax.runs.clone checks its flags with this table.
    RANGES: ClassVar[Dict[str, tuple]] = {
        "target_scale": (0, None, "> 0"), "lr": (0, None, "> 0"), "x_std": (0, None, "> 0"),
        "w_max": (0, None), "b_max": (0, None), "e_max": (0, None, "> 0"),
        "e_decades": (0, None), "steps": (1, None), "fwd_unit": (0, None, "> 0"),
        "store_unit": (0, None, "> 0"), "x_repeat_prob": (0, 1), "bias_lr_scale": (0, None),
        "fwd_weight": (0, None), "store_weight": (0, None), "bwd_weight": (0, None),
        "huber_delta": (0, None, "> 0"), "x_low": (None, None), "x_high": (None, None),
        "label_prob_max": (0, 1, "> 0"), "log_count_scale": (0, None),
        "count_max": (0, None)}

    def __post_init__(self):
        for name, (low, high, *positive) in self.RANGES.items():
            value = getattr(self, name)
            bad = value != value or value in (float("inf"), float("-inf"))
            bad = bad or (low is not None and value < low) or (high is not None and value > high)
            if bad or (positive and value <= 0):
                want = ("> 0" if positive and high is None else
                        f"in ({low}, {high}]" if positive else
                        f"in [{low}, {high}]" if low is not None and high is not None else
                        f">= {low}" if low is not None else "finite")
                raise ValueError(f"CloneSpec: {name}={value} must be {want}.")
        if not self.x_low < self.x_high:
            raise ValueError(f"CloneSpec: x_low={self.x_low} must be < x_high={self.x_high}.")


def clone_config(layer_sizes=(784, 10), *, hidden_size: int = 32, msg_size: int = 4,
                 micro_ticks: int = 2, target_scale: float = 20.0,
                 w_init_std: float = 0.0, error_scale: float = 1.0,
                 state_clip: float = 4.0) -> VSMLConfig:
    """The VSMLConfig a cloned learner runs with (and is trained with).

    Args:
      layer_sizes: network at meta-test, e.g. (784, 10); the cloning objective
        itself only uses the cell shapes, so the same V_M runs on any sizes.
      w_init_std: std of the initial weights w (true units) at meta-test.
      error_scale: multiplies e at meta-test, i.e. rescales the learning rate.
    """
    if hidden_size < 2:
        raise ValueError(f"clone_config: hidden_size={hidden_size} must be >= 2 to hold "
                         "w and b.")
    return VSMLConfig(
        layer_sizes=tuple(layer_sizes), cell="lstm", hidden_size=hidden_size,
        msg_size=msg_size, micro_ticks=micro_ticks, backward_interaction=True,
        reduce="sum", input_slot=0, output_slot=0, error_slot=0, feed_label=False,
        readout_scale=target_scale, readout_tanh=False, error_scale=error_scale,
        state_clip=state_clip, init_std=w_init_std / target_scale,
        # round(1/H * H) = 1: only c[W_SLOT] starts random (see module doc).
        init_random_fraction=1.0 / hidden_size, tie_layers=True, coordinates=False,
        protocol="predict_then_learn")


def stacked_clone_config(cfg: VSMLConfig, hidden_sizes, w_init_std: float) -> VSMLConfig:
    """A cloned learner's config for a stack of layers (paper sec. 3.1, "stacking").

    The same cells (tied V_M) run every layer of layer_sizes = (A, *hidden_sizes, C);
    protocol "predict_then_backprop" gives the error e' the cells send backwards
    one pass per layer to reach the layers below, and slot_messages passes
    only y and e' between layers (the cells never saw the other message
    slots filled), so the stack implements backprop through
    y = tanh(... tanh(tanh(x) W1) ...) WL. The stored weights
    start N(0, w_init_std^2) (true units) in every layer, which breaks the
    symmetry between hidden units.
    """
    check_clone_config(cfg)
    sizes = (cfg.layer_sizes[0],) + tuple(int(n) for n in hidden_sizes) + (cfg.num_classes,)
    if any(n < 1 for n in sizes):
        raise ValueError(f"stacked_clone_config: layer sizes {sizes} must be >= 1.")
    return cfg.replace(layer_sizes=sizes, protocol="predict_then_backprop",
                       slot_messages=True, init_std=w_init_std / cfg.readout_scale)


def check_clone_config(cfg: VSMLConfig) -> None:
    """Raises ValueError if `cfg` breaks the conventions the clone relies on."""
    want = dict(cell="lstm", reduce="sum", backward_interaction=True, coordinates=False,
                feed_label=False)
    if cfg.feed_label:  # a nearest-mean clone (nearest_mean_config)
        want.update(reduce="mean", feed_label=True)
    if cfg.protocol not in ("predict_then_learn", "predict_then_backprop"):
        raise ValueError(f"cloning: cfg.protocol={cfg.protocol!r} but the clone needs "
                         "'predict_then_learn' (or 'predict_then_backprop' for stacked "
                         "layers); build the config with clone_config().")
    for name, value in want.items():
        if getattr(cfg, name) != value:
            raise ValueError(f"cloning: cfg.{name}={getattr(cfg, name)!r} but the clone "
                             f"needs {value!r}; build the config with clone_config().")


# ---------------------------------------------------------------- targets
def forward_target(x, w, b):
    """y = tanh(x) w + b (elementwise, any broadcastable shapes)."""
    return jnp.tanh(x) * w + b


def backprop_targets(x, w, b, e, lr, bias_lr=None):
    """The exact backprop step of y = tanh(x) w + b for the error e = dL/dy.

    Returns (w_new, b_new, e_prev) with w_new = w - lr e tanh(x),
    b_new = b - bias_lr e (bias_lr defaults to lr) and
    e_prev = dL/dx = e w (1 - tanh(x)^2) (using the weight before the
    update, as backprop does).
    """
    t = jnp.tanh(x)
    bias_lr = lr if bias_lr is None else bias_lr
    return w - lr * e * t, b - bias_lr * e, e * w * (1.0 - t * t)


# ------------------------------------------------------ cells in isolation
@struct.dataclass
class StateEncoding:
    """How a state holding (w, b) looks apart from its two fixed slots.

    Training-only variables: the state of a cell holding (w, b) is
    h = (w u_h + b v_h) / s, c = (w u_c + b v_c) / s with c[W_SLOT] = w / s and
    c[B_SLOT] = b / s imposed. It is linear, so (w, b) = (0, 0) is the all-zero
    state that `init_state` makes at meta-test; it lets the cell keep working
    copies of w and b from the first step on. u, v: [2, H] (rows: h, c).
    """
    u: jax.Array
    v: jax.Array


def init_encoding(cfg: VSMLConfig) -> StateEncoding:
    """All-zero encoding: w, b only in their fixed slots."""
    z = jnp.zeros((2, cfg.hidden_size), jnp.dtype(cfg.dtype))
    return StateEncoding(u=z, v=z)


def encoding_to_dict(encoding: Optional[StateEncoding]) -> Optional[Dict[str, list]]:
    """JSON-friendly form of an encoding (stored in a clone's learner.json)."""
    if encoding is None:
        return None
    return {"u": jnp.asarray(encoding.u).tolist(), "v": jnp.asarray(encoding.v).tolist()}


def encoding_from_info(info: Dict) -> Optional[StateEncoding]:
    """The StateEncoding stored in a clone's learner.json, or None."""
    d = info.get("clone_encoding")
    if not d:
        return None
    return StateEncoding(u=jnp.asarray(d["u"], jnp.float32),
                         v=jnp.asarray(d["v"], jnp.float32))


def encode_state(cfg: VSMLConfig, spec: CloneSpec, w, b,
                 encoding: Optional[StateEncoding] = None) -> LayerState:
    """States of K single cells holding (w, b): h, c [K, H]; w, b [K] true units."""
    enc = init_encoding(cfg) if encoding is None else encoding
    ws, bs = (w / spec.target_scale)[:, None], (b / spec.target_scale)[:, None]
    h = ws * enc.u[0] + bs * enc.v[0]
    c = ws * enc.u[1] + bs * enc.v[1]
    c = c.at[:, W_SLOT].set(ws[:, 0]).at[:, B_SLOT].set(bs[:, 0])
    return LayerState(h=h, c=c)


def decode_state(spec: CloneSpec, c) -> Tuple[jax.Array, jax.Array]:
    """(w, b) in true units from context vectors c [..., H]."""
    return c[..., W_SLOT] * spec.target_scale, c[..., B_SLOT] * spec.target_scale


def cell_pass(params: VSMLParams, state: LayerState, x, e, label=None
              ) -> Tuple[LayerState, jax.Array, jax.Array]:
    """One pass (micro_ticks ticks) of K independent cells on their own messages.

    Each cell sees the messages it would see as cell (a, b) of a layer:
    forward message [x, 0, ...] (x on input_slot) and backward message
    [e, 0, ...] (e on error_slot). It ticks with `vsml_jax.reference.cell_tick`,
    the per-cell definition the fast grid kernels are tested against (vmapped
    over K cells it is also ~2x faster here than K separate 1x1 grids).

    Args:
      state: h, c [K, H]; x, e [K]: forward input and backward error.
    Returns:
      (new state, forward message [K, m] = h @ C, backward message [K, m] = h @ U);
      in a layer these are summed over a (forward) or b (backward).
    """
    cfg, p = params.cfg, params.layer(0)
    dtype = jnp.dtype(cfg.dtype)
    K = x.shape[0]
    f = jnp.zeros((K, cfg.msg_size), dtype).at[:, cfg.input_slot].set(x.astype(dtype))
    g = jnp.zeros((K, cfg.msg_size), dtype).at[:, cfg.error_slot].set(e.astype(dtype))
    if label is not None:  # feed_label configs: y_b on label_slot (network.error_message)
        g = g.at[:, cfg.label_slot].set(label.astype(dtype))
    coord = jnp.zeros((K, 3), dtype)  # unused: clone configs have no coordinates
    tick = jax.vmap(lambda h, c, fi, gi, k: reference.cell_tick(p, cfg, h, c, fi, gi, k))
    h, c = state.h, state.c
    for _ in range(cfg.micro_ticks):
        h, c = tick(h, c, f, g, coord)
    return LayerState(h=h, c=c), h @ p.c_fwd, h @ p.u_bwd


def cell_forward(params: VSMLParams, spec: CloneSpec, state: LayerState, x):
    """Predict pass (e = 0): returns (state, y [K] in true units)."""
    state, fwd, _ = cell_pass(params, state, x, jnp.zeros_like(x))
    return state, fwd[:, params.cfg.output_slot] * spec.target_scale


def cell_backward(params: VSMLParams, state: LayerState, x, e):
    """Learn pass on error e: returns (state, e' [K] from the backward message)."""
    state, _, bwd = cell_pass(params, state, x, e)
    return state, bwd[:, params.cfg.error_slot]


# -------------------------------------------------------------- objective
class CloneBatch(NamedTuple):
    """Random data for K cells and T steps: w0, b0 [K]; x, e [T, K].

    Stage "nearest_mean": w0, b0 are the start (m0, q0) and y [T, K] the 0/1
    labels of the cells' class.
    """
    w0: jax.Array
    b0: jax.Array
    x: jax.Array
    e: jax.Array
    y: Optional[jax.Array] = None


def sample_batch(key: jax.Array, spec: CloneSpec, batch_size: int,
                 stage: str = "backprop") -> CloneBatch:
    """Random (w0, b0) per cell and (x_t, e_t) per step, see CloneSpec."""
    if stage == "nearest_mean":
        return nm_sample_batch(key, spec, batch_size)
    kw, kb, kx, ke, kd, kr = jax.random.split(key, 6)
    K, T = batch_size, spec.steps
    e = jax.random.uniform(ke, (T, K), minval=-spec.e_max, maxval=spec.e_max)
    e = e * 10.0 ** (-spec.e_decades * jax.random.uniform(kd, (T, K)))
    x = spec.x_std * jax.random.normal(kx, (T, K))
    repeat = jax.random.uniform(kr, (K,)) < spec.x_repeat_prob
    x = jnp.where(repeat, x[0], x)
    return CloneBatch(
        w0=jax.random.uniform(kw, (K,), minval=-spec.w_max, maxval=spec.w_max),
        b0=jax.random.uniform(kb, (K,), minval=-spec.b_max, maxval=spec.b_max),
        x=x, e=e)


def clone_rollout(params: VSMLParams, spec: CloneSpec, batch: CloneBatch, stage: str,
                  encoding: Optional[StateEncoding] = None,
                  start: Optional[LayerState] = None
                  ) -> Tuple[Dict[str, jax.Array], LayerState]:
    """Runs the cells and the exact rule side by side for T steps.

    Args:
      batch: (w0, b0) [K] the weights the cells start with, (x, e) [T, K].
      start: the cells' states [K, H] (e.g. persistent chains, whose w0, b0
        are `decode_state` of it); default: `encode_state(w0, b0)`.
    Returns:
      (outs, final state). outs maps names to [T, K] arrays: y, y_target;
      w_keep, b_keep (stored after the predict pass) and w_prev, b_prev
      (their targets); for stage "backprop" also w_new, b_new (stored after
      the learn pass), w_new_target, b_new_target, e_prev, e_prev_target.
    """
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is unknown; use one of {STAGES}.")
    state = (encode_state(params.cfg, spec, batch.w0, batch.b0, encoding)
             if start is None else start)

    def body(carry, xe):
        state, w, b = carry
        x, e = xe
        state, y = cell_forward(params, spec, state, x)
        w_keep, b_keep = decode_state(spec, state.c)
        out = dict(y=y, y_target=forward_target(x, w, b), w_keep=w_keep, b_keep=b_keep,
                   w_prev=w, b_prev=b)
        if stage == "backprop":
            state, e_prev = cell_backward(params, state, x, e)
            w_next, b_next, e_prev_target = backprop_targets(
                x, w, b, e, spec.lr, spec.lr * spec.bias_lr_scale)
            w_new, b_new = decode_state(spec, state.c)
            out.update(w_new=w_new, b_new=b_new, w_new_target=w_next,
                       b_new_target=b_next, e_prev=e_prev, e_prev_target=e_prev_target)
            w, b = w_next, b_next
        return (state, w, b), out

    (state, _, _), outs = jax.lax.scan(body, (state, batch.w0, batch.b0),
                                       (batch.x, batch.e))
    return outs, state


def over_cells(rollout: Callable, mesh: Optional[Mesh]) -> Callable:
    """`rollout(params, spec, batch, start, *rest)` with the K cells split over
    `mesh` (its first axis), for data-parallel cloning.

    The cells are independent, so each device runs its share of the T-step
    scan with the same per-cell program (`jax.shard_map`); params (and `rest`)
    are replicated. Run under sharding constraints alone, XLA all-reduced the
    gradient of V_M inside the scan, once per step (measured with
    `hlo_stats.collectives`); here it is summed once, where the gradient leaves
    the map. batch: [K] and [T, K] arrays; start: LayerState [K, H] (required:
    a default start would be built from the local K). Returns the rollout's
    (outs [T, K] per name, final state [K, H]), split over the mesh.
    """
    if mesh is None or mesh.devices.size == 1:
        return rollout
    axis = mesh.axis_names[0]
    split = lambda v: P(None, axis) if v.ndim == 2 else P(axis)  # [T, K] or [K]

    def run(params, spec, batch, start, *rest):
        local = lambda p, b, s, *r: rollout(p, spec, b, s, *r)
        batch_specs = jax.tree_util.tree_map(split, batch)
        return jax.shard_map(
            local, mesh=mesh,
            in_specs=(P(), batch_specs, P(axis)) + (P(),) * len(rest),
            out_specs=(P(None, axis), P(axis)),
            # check_vma=True sums the gradient of the replicated params where
            # the scan uses them, i.e. inside the loop; unchecked, it is
            # summed once at the map's boundary.
            check_vma=False)(params, batch, start, *rest)
    return run


def clone_loss(params: VSMLParams, spec: CloneSpec, batch: CloneBatch, stage: str,
               encoding: Optional[StateEncoding] = None,
               start: Optional[LayerState] = None, mesh: Optional[Mesh] = None
               ) -> Tuple[jax.Array, Tuple[Dict[str, jax.Array], LayerState]]:
    """Scalar Smooth-L1 cloning loss, metrics and the cells' final states.

    Metrics: loss; fwd_mae (true units) and fwd_rel (fwd_mae / std of the
    target); keep_mae (drift of the stored w, b during the predict pass, in
    units of lr); for "backprop" also upd_mae (stored w, b after the learn
    pass vs exact, units of lr), upd_rel (upd_mae / mean |exact update|, in the
    same units) and bwd_mae, bwd_rel (e').

    mesh: split the cells over it (`over_cells`); loss and metrics are the
    same as without, up to float reassociation.
    """
    if stage == "nearest_mean":
        return nm_loss(params, spec, batch, start, mesh)
    if start is None:
        start = encode_state(params.cfg, spec, batch.w0, batch.b0, encoding)
    o, final = over_cells(
        lambda p, sp, b, s, enc: clone_rollout(p, sp, b, stage, enc, s), mesh)(
            params, spec, batch, start, encoding)
    d = spec.huber_delta
    hub = lambda r: jnp.mean(optax.huber_loss(r, delta=d))
    fwd = hub((o["y"] - o["y_target"]) / spec.fwd_unit)
    unit = spec.lr * spec.store_unit
    keep = 0.5 * (hub((o["w_keep"] - o["w_prev"]) / unit)
                  + hub((o["b_keep"] - o["b_prev"]) / unit))
    loss = spec.fwd_weight * fwd + spec.store_weight * keep
    fwd_mae = jnp.mean(jnp.abs(o["y"] - o["y_target"]))
    metrics = dict(
        fwd_loss=fwd, keep_loss=keep, fwd_mae=fwd_mae,
        fwd_rel=fwd_mae / jnp.std(o["y_target"]),
        keep_mae=0.5 * jnp.mean(jnp.abs(o["w_keep"] - o["w_prev"])
                                + jnp.abs(o["b_keep"] - o["b_prev"])) / spec.lr)
    if stage == "backprop":
        upd = 0.5 * (hub((o["w_new"] - o["w_new_target"]) / unit)
                     + hub((o["b_new"] - o["b_new_target"]) / unit))
        bwd = hub((o["e_prev"] - o["e_prev_target"]) / spec.fwd_unit)
        loss = loss + spec.store_weight * upd + spec.bwd_weight * bwd
        upd_mae = 0.5 * jnp.mean(jnp.abs(o["w_new"] - o["w_new_target"])
                                 + jnp.abs(o["b_new"] - o["b_new_target"])) / spec.lr
        exact = 0.5 * jnp.mean(jnp.abs(o["w_new_target"] - o["w_prev"])
                               + jnp.abs(o["b_new_target"] - o["b_prev"])) / spec.lr
        bwd_mae = jnp.mean(jnp.abs(o["e_prev"] - o["e_prev_target"]))
        metrics.update(upd_loss=upd, bwd_loss=bwd, upd_mae=upd_mae,
                       upd_rel=upd_mae / exact, bwd_mae=bwd_mae,
                       bwd_rel=bwd_mae / jnp.std(o["e_prev_target"]))
    metrics["loss"] = loss
    return loss, (metrics, final)


# ----------------------------------------------------- persistent chains
@struct.dataclass
class Chains:
    """K training cells kept from one unroll to the next.

    state: h, c [K, H]; w, b [K]: the exact weights they should hold (the
    exact rule applied since the cell was last restarted).
    """
    state: LayerState
    w: jax.Array
    b: jax.Array


def init_chains(key: jax.Array, cfg: VSMLConfig, spec: CloneSpec, num_cells: int,
                encoding: Optional[StateEncoding] = None, stage: str = "backprop"
                ) -> Chains:
    """K fresh cells holding random (w, b) as in `sample_batch` (stage
    "nearest_mean": the all-zero state, m = q = 0)."""
    if stage == "nearest_mean":
        z = jnp.zeros((num_cells,), jnp.float32)
        return Chains(state=nm_zero_state(cfg, num_cells), w=z, b=z)
    batch = sample_batch(key, spec, num_cells)
    return Chains(state=encode_state(cfg, spec, batch.w0, batch.b0, encoding),
                  w=batch.w0, b=batch.b0)


def chain_batch(key: jax.Array, cfg: VSMLConfig, spec: CloneSpec, chains: Chains,
                reset_prob: float, max_drift: float, stage: str,
                encoding: Optional[StateEncoding] = None
                ) -> Tuple[LayerState, CloneBatch, Chains, jax.Array]:
    """Start states and data for one training unroll of persistent cells.

    Training only on fresh states teaches the first few steps; at meta-test a
    cell runs for 10^4 steps. So the K training cells are kept from one
    unroll to the next, and each restarts from a fresh encoded (w0, b0) with
    probability `reset_prob`, or when what it stores has drifted more than
    `max_drift` (units of lr) from the exact trajectory: only cells that still
    hold good weights live on, so states of all ages are trained without the
    population collapsing into whatever a poor clone drifts to. A kept cell
    starts from what it stores: the exact rule is re-synchronised to
    (w0, b0) = decode_state(c), so the loss measures the error made within
    this unroll (past errors cannot be undone by it).

    Returns:
      (start states [K, H], batch whose w0, b0 are the start weights, the
      chains advanced by the exact rule over the batch (their `state` still
      the start state: replace it by the unroll's final state), the [K] mask
      of restarted cells).
    """
    if stage == "nearest_mean":
        return nm_chain_batch(key, cfg, spec, chains, reset_prob, max_drift)
    k_batch, k_reset = jax.random.split(key)
    batch = sample_batch(k_batch, spec, chains.w.shape[0])
    w_kept, b_kept = decode_state(spec, chains.state.c)
    drift = jnp.maximum(jnp.abs(w_kept - chains.w), jnp.abs(b_kept - chains.b)) / spec.lr
    reset = (jax.random.uniform(k_reset, chains.w.shape) < reset_prob) | (drift > max_drift)
    reset = reset | ~jnp.isfinite(drift)
    fresh = encode_state(cfg, spec, batch.w0, batch.b0, encoding)
    pick = lambda new, old: jnp.where(reset.reshape(reset.shape + (1,) * (new.ndim - 1)),
                                      new, old)
    start = jax.tree_util.tree_map(pick, fresh, chains.state)
    w_exact, b_exact = pick(batch.w0, chains.w), pick(batch.b0, chains.b)
    batch = batch._replace(w0=pick(batch.w0, w_kept), b0=pick(batch.b0, b_kept))
    if stage == "backprop":  # the exact rule's total change over the unroll
        w_exact = w_exact - spec.lr * jnp.sum(batch.e * jnp.tanh(batch.x), axis=0)
        b_exact = b_exact - spec.lr * spec.bias_lr_scale * jnp.sum(batch.e, axis=0)
    return start, batch, Chains(state=start, w=w_exact, b=b_exact), reset


def long_run_errors(params: VSMLParams, spec: CloneSpec, key: jax.Array, num_cells: int,
                    num_steps: int, encoding: Optional[StateEncoding] = None
                    ) -> Dict[str, jax.Array]:
    """How far the clone strays from exact backprop over a long free run.

    K cells start from random (w0, b0) and run `num_steps` (predict, learn)
    steps on random data with the exact rule tracked alongside and never
    re-synchronised, so errors accumulate as they would at meta-test.

    Returns scalars: w_err_end, b_err_end (mean |stored - exact| after the
    last step, in units of lr), fwd_mae_end (mean |y - exact y| over the last
    10% of steps, true units), fwd_rel_end (that / std of the exact y) and
    bwd_mae_end (same for e').
    """
    batch = sample_batch(key, dataclasses.replace(spec, steps=num_steps), num_cells)
    o, _ = clone_rollout(params, spec, batch, "backprop", encoding)
    tail = max(1, num_steps // 10)
    fwd_err = jnp.abs(o["y"][-tail:] - o["y_target"][-tail:])
    return dict(
        w_err_end=jnp.mean(jnp.abs(o["w_new"][-1] - o["w_new_target"][-1])) / spec.lr,
        b_err_end=jnp.mean(jnp.abs(o["b_new"][-1] - o["b_new_target"][-1])) / spec.lr,
        fwd_mae_end=jnp.mean(fwd_err),
        fwd_rel_end=jnp.mean(fwd_err) / jnp.std(o["y_target"][-tail:]),
        bwd_mae_end=jnp.mean(jnp.abs(o["e_prev"][-tail:] - o["e_prev_target"][-tail:])))


# ------------------------------------------------ nearest class mean (stage)
# Cell (a, b) of a layer keeps the running mean m of input a over the examples
# of class b and q = n / (n + 1), n the count of those examples (q starts at
# 0 with the all-zero state and stays in [0, 1), so it fits an LSTM state):
#
#   predict pass on x:           emits  x m - m^2 / 2   (state unchanged)
#   learn pass on (x, e, y_b):   if y_b = 1:  m <- q m + (1 - q) x,
#                                             q <- 1 / (2 - q)
#
# (m + (x - m) / (n + 1) is the running mean; 1 / (2 - q) = (n + 1) / (n + 2).)
# Summed over a, sum_a (x_a m_ab - m_ab^2 / 2) = -|x - mu_b|^2 / 2 + |x|^2 / 2:
# the nearest-class-mean score up to a term that is the same for every class.
# The cell reads y_b from the label slot (feed_label) and is trained to ignore
# the error e. Storage: c[W_SLOT] = m / s, c[Q_SLOT] = q; the forward message
# carries (x m - m^2 / 2) / s on output_slot.


def conventions(stage: str, spec: Optional[CloneSpec] = None) -> str:
    """One line on where a clone of `stage` keeps its values (for learner.json)."""
    if stage == "nearest_mean":
        K = 0.0 if spec is None else spec.log_count_scale
        count = f"log(n+1)/{K:g}" if K > 0 else "q = n/(n+1)"
        if spec is not None and spec.input_tanh:
            count += " (m: the mean of tanh(x), scored as tanh(x) m - m^2/2)"
        return (f"m/s in c[0], {count} in c[1]; x on forward slot 0, label y_b on "
                "backward slot 1, (x m - m^2/2)/s on forward slot 0 (readout_scale="
                "logit_scale*s); protocol predict_then_learn, reduce mean.")
    return ("w/s in c[0], b/s in c[1]; x on forward slot 0, y/s on forward slot 0 "
            "(readout_scale=s), e and e' on backward slot 0; protocol "
            "predict_then_learn, reduce sum.")


def nearest_mean_config(layer_sizes=(784, 10), *, hidden_size: int = 16, msg_size: int = 4,
                        micro_ticks: int = 2, target_scale: float = 4.0,
                        logit_scale: float = 30.0, error_scale: float = 1.0,
                        state_clip: float = 4.0) -> VSMLConfig:
    """The VSMLConfig a nearest-mean clone runs with.

    protocol predict_then_learn with the label fed on slot 1; reduce "mean",
    so logits_b = logit_scale * mean_a (x_a m_ab - m_ab^2 / 2)
    (= -logit_scale |x - mu_b|^2 / (2 D) + const: argmax is the nearest mean,
    and the softmax temperature does not depend on D).
    """
    if hidden_size < 2 or msg_size < 2:
        raise ValueError(f"nearest_mean_config: hidden_size={hidden_size} and msg_size="
                         f"{msg_size} must be >= 2 (m and q; x/e and the label).")
    return VSMLConfig(
        layer_sizes=tuple(layer_sizes), cell="lstm", hidden_size=hidden_size,
        msg_size=msg_size, micro_ticks=micro_ticks, backward_interaction=True,
        reduce="mean", input_slot=0, output_slot=0, error_slot=0, feed_label=True,
        label_slot=1, readout_scale=logit_scale * target_scale, readout_tanh=False,
        error_scale=error_scale, state_clip=state_clip, init_std=0.0,
        init_random_fraction=1.0 / hidden_size, tie_layers=True, coordinates=False,
        protocol="predict_then_learn")


def nm_feature(spec: CloneSpec, x):
    """What the cloned nearest-mean rule averages and scores: x, or tanh(x)."""
    return jnp.tanh(x) if spec.input_tanh else x


def nearest_mean_targets(x, m, q, y):
    """Exact rule: (output x m - m^2/2, m_new, q_new) for labels y in {0, 1}."""
    out = x * m - 0.5 * m * m
    m_new = jnp.where(y > 0, q * m + (1.0 - q) * x, m)
    q_new = jnp.where(y > 0, 1.0 / (2.0 - q), q)
    return out, m_new, q_new


def nm_zero_state(cfg: VSMLConfig, num_cells: int) -> LayerState:
    """K cells with nothing seen (m = q = 0): the state init_state gives at meta-test."""
    z = jnp.zeros((num_cells, cfg.hidden_size), jnp.dtype(cfg.dtype))
    return LayerState(h=z, c=z)


def nm_fresh_cells(key: jax.Array, cfg: VSMLConfig, spec: CloneSpec, num_cells: int
                   ) -> Tuple[LayerState, jax.Array, jax.Array]:
    """Start states of restarting training cells and the (m, q) they hold.

    All-zero (m = q = 0) with spec.count_max = 0; else half of them hold a
    random mean and count (see CloneSpec.count_max). Returns (state, m, q),
    m and q [K].
    """
    zero = nm_zero_state(cfg, num_cells)
    z = jnp.zeros((num_cells,), zero.c.dtype)
    if spec.count_max <= 0:
        return zero, z, z
    k_on, k_m, k_n = jax.random.split(key, 3)
    on = jax.random.uniform(k_on, (num_cells,)) < 0.5
    m = jnp.where(on, nm_feature(spec, jax.random.uniform(
        k_m, (num_cells,), minval=spec.x_low, maxval=spec.x_high)), 0.0)
    log_n1 = jax.random.uniform(k_n, (num_cells,)) * jnp.log1p(spec.count_max)
    q = jnp.where(on, -jnp.expm1(-log_n1), 0.0)  # n / (n + 1) = 1 - 1 / (n + 1)
    c = zero.c.at[:, W_SLOT].set(m / spec.target_scale).at[:, Q_SLOT].set(
        nm_count_code(spec, q))
    return LayerState(h=zero.h, c=c), m, q


def nm_decode(spec: CloneSpec, c) -> Tuple[jax.Array, jax.Array]:
    """(m, q) from context vectors c [..., H] (see CloneSpec.log_count_scale)."""
    code = c[..., Q_SLOT]
    if spec.log_count_scale > 0:
        code = -jnp.expm1(-spec.log_count_scale * code)  # 1 - 1/(n+1) from log(n+1)/K
    return c[..., W_SLOT] * spec.target_scale, code


def nm_count_code(spec: CloneSpec, q):
    """What c[Q_SLOT] holds for q = n/(n+1): q, or log(n + 1) / K. Inverse of
    `nm_decode`'s q for every stored value."""
    if spec.log_count_scale > 0:
        return -jnp.log1p(-q) / spec.log_count_scale
    return q


def nm_sample_batch(key: jax.Array, spec: CloneSpec, batch_size: int) -> CloneBatch:
    """Random pixels, labels and errors for K cells over `spec.steps` steps.

    x ~ U(x_low, x_high), or x_low (a background pixel) with a per-cell
    probability ~ U(0, 1); y ~ Bernoulli(p), p ~ U(0, label_prob_max) per cell;
    e = p_t - y with p_t ~ U(0, 1) (what softmax - one-hot looks like).
    Start (m0, q0) = (0, 0).
    """
    kx, kb, kbp, ky, kyp, ke = jax.random.split(key, 6)
    K, T = batch_size, spec.steps
    x = jax.random.uniform(kx, (T, K), minval=spec.x_low, maxval=spec.x_high)
    bg = jax.random.uniform(kb, (T, K)) < jax.random.uniform(kbp, (K,))
    x = jnp.where(bg, spec.x_low, x)
    p = spec.label_prob_max * jax.random.uniform(kyp, (K,))
    y = (jax.random.uniform(ky, (T, K)) < p).astype(jnp.float32)
    e = jax.random.uniform(ke, (T, K)) - y
    z = jnp.zeros((K,), jnp.float32)
    return CloneBatch(w0=z, b0=z, x=x, e=e, y=y)


def nm_rollout(params: VSMLParams, spec: CloneSpec, batch: CloneBatch,
               start: Optional[LayerState] = None
               ) -> Tuple[Dict[str, jax.Array], LayerState]:
    """Cells and the exact nearest-mean rule side by side for T steps.

    Returns (outs, final state); outs maps names to [T, K]: out, out_target
    (predict pass, true units), m_keep, q_keep (stored after the predict pass)
    with targets m_prev, q_prev, and m_new, q_new (after the learn pass) with
    targets m_new_target, q_new_target.
    """
    cfg = params.cfg
    state = nm_zero_state(cfg, batch.x.shape[1]) if start is None else start

    def body(carry, xey):
        state, m, q = carry
        x, e, y = xey
        state, out = cell_forward(params, spec, state, x)
        m_keep, q_keep = nm_decode(spec, state.c)
        state, _, _ = cell_pass(params, state, x, e, y)
        m_new, q_new = nm_decode(spec, state.c)
        out_target, m_next, q_next = nearest_mean_targets(nm_feature(spec, x), m, q, y)
        o = dict(out=out, out_target=out_target, m_keep=m_keep, q_keep=q_keep, m_prev=m,
                 q_prev=q, m_new=m_new, q_new=q_new, m_new_target=m_next,
                 q_new_target=q_next)
        return (state, m_next, q_next), o

    (state, _, _), outs = jax.lax.scan(body, (state, batch.w0, batch.b0),
                                       (batch.x, batch.e, batch.y))
    return outs, state


def nm_loss(params: VSMLParams, spec: CloneSpec, batch: CloneBatch,
            start: Optional[LayerState] = None, mesh: Optional[Mesh] = None):
    """Smooth-L1 loss of the nearest-mean clone: (loss, (metrics, final state)).

    Output residuals in units of fwd_unit, stored m and q (after each pass)
    in units of store_unit. Metrics: out_mae, out_rel (/ std of the target),
    m_mae, q_mae (after the learn pass), keep_mae (drift during the predict
    pass). mesh: split the cells over it (`over_cells`).
    """
    if start is None:
        start = nm_zero_state(params.cfg, batch.x.shape[1])
    o, final = over_cells(nm_rollout, mesh)(params, spec, batch, start)
    hub = lambda r: jnp.mean(optax.huber_loss(r, delta=spec.huber_delta))
    fwd = hub((o["out"] - o["out_target"]) / spec.fwd_unit)
    u = spec.store_unit
    # The count is compared as stored (q or the log count), in store_units.
    code = functools.partial(nm_count_code, spec)
    keep = 0.5 * (hub((o["m_keep"] - o["m_prev"]) / u)
                  + hub((code(o["q_keep"]) - code(o["q_prev"])) / u))
    upd = 0.5 * (hub((o["m_new"] - o["m_new_target"]) / u)
                 + hub((code(o["q_new"]) - code(o["q_new_target"])) / u))
    loss = spec.fwd_weight * fwd + spec.store_weight * (keep + upd)
    out_mae = jnp.mean(jnp.abs(o["out"] - o["out_target"]))
    metrics = dict(
        loss=loss, fwd_loss=fwd, keep_loss=keep, upd_loss=upd, out_mae=out_mae,
        out_rel=out_mae / (jnp.std(o["out_target"]) + 1e-8),
        m_mae=jnp.mean(jnp.abs(o["m_new"] - o["m_new_target"])),
        q_mae=jnp.mean(jnp.abs(o["q_new"] - o["q_new_target"])),
        keep_mae=0.5 * jnp.mean(jnp.abs(o["m_keep"] - o["m_prev"])
                                + jnp.abs(o["q_keep"] - o["q_prev"])),
        mean_count=jnp.mean(o["q_new_target"] / (1.0 - o["q_new_target"])))
    return loss, (metrics, final)


def nm_chain_batch(key: jax.Array, cfg: VSMLConfig, spec: CloneSpec, chains: Chains,
                   reset_prob: float, max_drift: float
                   ) -> Tuple[LayerState, CloneBatch, Chains, jax.Array]:
    """`chain_batch` of the nearest-mean stage: chains.w, chains.b hold the
    exact (m, q). A cell restarts from the zero state with probability
    reset_prob or when its stored m or q is more than max_drift store_units off;
    a kept cell is re-synchronised to what it stores."""
    k_batch, k_reset, k_fresh = jax.random.split(key, 3)
    K = chains.w.shape[0]
    batch = nm_sample_batch(k_batch, spec, K)
    m_kept, q_kept = nm_decode(spec, chains.state.c)
    drift = jnp.maximum(jnp.abs(m_kept - chains.w),
                        jnp.abs(nm_count_code(spec, q_kept) - nm_count_code(spec, chains.b))
                        ) / spec.store_unit
    reset = (jax.random.uniform(k_reset, (K,)) < reset_prob) | (drift > max_drift)
    reset = reset | ~jnp.isfinite(drift)
    fresh, m_fresh, q_fresh = nm_fresh_cells(k_fresh, cfg, spec, K)
    start = jax.tree_util.tree_map(lambda n, o: jnp.where(reset[:, None], n, o), fresh,
                                   chains.state)
    m0 = jnp.where(reset, m_fresh, m_kept)
    q0 = jnp.where(reset, q_fresh, jnp.clip(q_kept, 0.0, 0.9999))
    batch = batch._replace(w0=m0, b0=q0)

    def exact(carry, xy):
        m, q = carry
        _, m, q = nearest_mean_targets(nm_feature(spec, xy[0]), m, q, xy[1])
        return (m, q), None

    (m_end, q_end), _ = jax.lax.scan(exact, (m0, q0), (batch.x, batch.y))
    return start, batch, Chains(state=start, w=m_end, b=q_end), reset
