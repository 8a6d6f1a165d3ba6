"""Configuration of a VS Meta RNN (the hyper-parameters that are *not* meta-learned).

A `VSMLConfig` is static metadata: it decides array shapes and control flow,
so it is a frozen, hashable dataclass rather than a pytree of arrays. It rides
along as static (aux) data inside `VSMLParams`, which is why
`unroll(params, state, data)` needs no config argument.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

CELLS = ("lstm", "vanilla")
REDUCTIONS = ("mean", "sum")
PROTOCOLS = ("delayed_error", "predict_then_learn", "predict_then_backprop")
DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True)
class VSMLConfig:
    """Architecture of a (possibly stacked) VS Meta RNN.

    Attributes:
      layer_sizes: neuron counts (n_0, n_1, ..., n_L). Layer l is a grid of
        A x B = n_l x n_{l+1} sub-RNNs ("cells"). The last entry is the number of
        classes that are predicted.
      cell: "lstm" (eq. 6, the paper's choice) or "vanilla" (eq. 3).
      hidden_size: H, the size of each cell's hidden vector (and of the LSTM
        context vector). Each cell's state is the emergent "weight".
      msg_size: m, size of the forward and backward messages between neurons.
      micro_ticks: recurrent steps of every layer per data point (and per phase).
      backward_interaction: whether the U term of eq. 14 exists, i.e. whether
        layers send backward messages to the layer before them. The error of the
        last layer always enters through the backward input of the last layer.
      reduce: how messages of the cells of one neuron are combined: "mean" (stable
        for wide layers) or "sum" (eq. 3 literally).
      input_slot: slot of layer 0's forward message that carries x_a.
      output_slot: slot of the last layer's outgoing forward message read as the
        prediction (logit) of class b.
      error_slot: slot of the last layer's backward message carrying e_b.
      feed_label: also feed the previous one-hot label y_b on `label_slot`.
      label_slot: slot of the label in the backward message (if feed_label).
      readout_scale: logits = readout_scale * (message value or its tanh).
      readout_tanh: bound the read-out message with tanh before scaling.
      error_scale: the fed error is error_scale * (softmax(logits) - y).
      state_clip: clip the recurrent state to [-state_clip, state_clip]
        (appendix C uses 4); None disables clipping.
      init_std: std of the random part of the initial state V_L.
      init_random_fraction: fraction of the H state dimensions of every cell that
        start random (N(0, init_std)); the others start at zero.
      tie_layers: one V_M shared by all layers (appendix C, "stacking"); False
        gives every layer its own V_M.
      coordinates: feed each cell its normalised coordinates a/A, b/B and its
        layer position (appendix C, "specialization").
      slot_messages: between stacked layers pass only slot values: layer l+1
        reads readout_scale x (slot output_slot of layer l's forward message)
        on its input_slot, and layer l reads slot error_slot of layer l+1's
        backward message; every other message entry is zero. This is the
        convention of cloned learners (vsml_jax.cloning), whose cells were
        never trained to see the other slots filled.
      protocol: "delayed_error": step t sees (x_t, e_{t-1}) and predicts y_t (the
        paper, sec. 3.2); "predict_then_learn": predict on (x_t, 0), then tick
        again on (x_t, e_t); "predict_then_backprop": a predict tick of every
        layer with no error anywhere, then one learn tick per layer from the
        top down, layer l reading its predict-tick input and the backward
        message layer l+1 sent after its learn tick, so the error reaches every
        layer of a stack for the same x_t (backprop's backward pass; for one
        layer it is predict_then_learn).
      clock_slot: -1 (off), or the slot of layer 0's forward message that
        carries the clock: clock_scale x the number of steps the state has
        taken (`VSMLState.step`), the same value for every input neuron. With
        coordinates, a cell can compare it with its own position, e.g. to act
        at one step of the stream only (`vsml_jax.slot_memory`).
      clock_scale: the clock's increment per step (> 0).
      param_init_scale: multiplies the default initialisation of V_M.
      dtype: float dtype of V_M and V_L ("bfloat16" is meant for accelerators).
    """

    layer_sizes: Tuple[int, ...] = (784, 10)
    cell: str = "lstm"
    hidden_size: int = 16
    msg_size: int = 8
    micro_ticks: int = 2
    backward_interaction: bool = True
    reduce: str = "mean"
    input_slot: int = 0
    output_slot: int = 0
    error_slot: int = 0
    feed_label: bool = False
    label_slot: int = 1
    readout_scale: float = 1.0
    readout_tanh: bool = False
    error_scale: float = 1.0
    state_clip: Optional[float] = 4.0
    init_std: float = 0.5
    init_random_fraction: float = 1.0
    tie_layers: bool = True
    coordinates: bool = False
    slot_messages: bool = False
    protocol: str = "delayed_error"
    clock_slot: int = -1
    clock_scale: float = 1.0
    param_init_scale: float = 1.0
    dtype: str = "float32"

    def __post_init__(self):
        # Normalise lists (e.g. from flags) to tuples so the config stays hashable.
        object.__setattr__(self, "layer_sizes", tuple(int(n) for n in self.layer_sizes))
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def num_layers(self) -> int:
        return len(self.layer_sizes) - 1

    @property
    def num_classes(self) -> int:
        return self.layer_sizes[-1]

    @property
    def input_size(self) -> int:
        return self.layer_sizes[0]

    @property
    def gate_size(self) -> int:
        """Width G of a cell's pre-activation: 4H for an LSTM, H for a vanilla RNN."""
        return 4 * self.hidden_size if self.cell == "lstm" else self.hidden_size

    @property
    def num_param_sets(self) -> int:
        """How many independent V_M copies exist (1 when layers are tied)."""
        return 1 if self.tie_layers else self.num_layers

    def replace(self, **changes) -> "VSMLConfig":
        return dataclasses.replace(self, **changes)

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raises ValueError naming the bad field and how to fix it."""
        def bad(msg):
            raise ValueError(f"VSMLConfig: {msg}")

        if len(self.layer_sizes) < 2:
            bad(f"layer_sizes={self.layer_sizes} needs at least an input and an "
                "output size, e.g. (784, 10).")
        if any(n < 1 for n in self.layer_sizes):
            bad(f"layer_sizes={self.layer_sizes} must be positive integers.")
        if self.cell not in CELLS:
            bad(f"cell={self.cell!r} is unknown; use one of {CELLS}.")
        if self.reduce not in REDUCTIONS:
            bad(f"reduce={self.reduce!r} is unknown; use one of {REDUCTIONS}.")
        if self.protocol not in PROTOCOLS:
            bad(f"protocol={self.protocol!r} is unknown; use one of {PROTOCOLS}.")
        if self.dtype not in DTYPES:
            bad(f"dtype={self.dtype!r} is unknown; use one of {DTYPES}.")
        for name in ("hidden_size", "msg_size", "micro_ticks"):
            if getattr(self, name) < 1:
                bad(f"{name}={getattr(self, name)} must be >= 1.")
        m = self.msg_size
        for name in ("input_slot", "output_slot", "error_slot"):
            slot = getattr(self, name)
            if not 0 <= slot < m:
                bad(f"{name}={slot} does not fit in a message of msg_size={m}; "
                    f"use a slot in [0, {m - 1}] or raise msg_size.")
        if self.feed_label:
            if not 0 <= self.label_slot < m:
                bad(f"label_slot={self.label_slot} does not fit in msg_size={m}: the "
                    f"backward message needs room for the error and the label; raise "
                    f"msg_size to at least {max(self.label_slot, self.error_slot) + 1} "
                    "or set feed_label=False.")
            if self.label_slot == self.error_slot:
                bad(f"label_slot and error_slot are both {self.error_slot}; the error "
                    "and the label need separate slots of the backward message.")
        if self.clock_slot != -1:
            if not 0 <= self.clock_slot < m:
                bad(f"clock_slot={self.clock_slot} does not fit in msg_size={m}; use a "
                    f"slot in [0, {m - 1}] or -1 (no clock).")
            if self.clock_slot == self.input_slot:
                bad(f"clock_slot and input_slot are both {self.input_slot}; the clock "
                    "needs its own slot of layer 0's forward message.")
        if not (math.isfinite(self.clock_scale) and self.clock_scale > 0):
            bad(f"clock_scale={self.clock_scale} must be a finite number > 0.")
        if self.state_clip is not None and self.state_clip <= 0:
            bad(f"state_clip={self.state_clip} must be positive or None.")
        if not 0.0 <= self.init_random_fraction <= 1.0:
            bad(f"init_random_fraction={self.init_random_fraction} must be in [0, 1].")
        if self.init_std < 0:
            bad(f"init_std={self.init_std} must be >= 0.")
