"""A VS-ML learner with a memory of examples, its V_M written by hand.

The nearest-class-mean clone (`pretrained:nearest_mean_clone`) shows what one
VS-ML layer does: a sum over inputs of per-cell terms. Rules that keep the
examples themselves (a Parzen window, nearest neighbour) are outside that
class, and they are what reaches the `pretrained:general` goal
(docs/general.md). This module shows that two VS-ML layers with a clock
express such a rule, with every cell of a layer running the same LSTM:

    inputs a (A)  ->  slots k (K)  ->  classes c (C)

- Layer 1, cell (a, k): at step k (the clock, `VSMLConfig.clock_slot`, equals
  its coordinate k / (K - 1)) it stores phi(x_a), phi(x) = tanh(tanh(squash
  (x - x_min))), once (a latch); at every step it sends ~ (phi(x_a) -
  phi(s_ak))^2 to slot k, so slot k receives the mean squared distance d_k
  between the input and the example it holds, and it sends whether its step
  is now (the window) on a second message slot.
- Layer 2, cell (k, c): while slot k's window is open it stores the label y_c
  fed back after the prediction (so 1 if slot k's example is of class c);
  it sends that times two LSTM output gates, sigmoid(z / 2)^2 with z = -gamma
  d_k + b0, i.e. a Gaussian kernel of the distance (~ exp(z) for z << 0).

Output c is then the kernel summed over the stored examples of class c: an
online Parzen window over the first K examples of the stream, on squashed
pixels, run entirely in the forward dynamics of two grids of LSTMs. Nothing
here is meta-learned; the three settings (squash, gamma, b0) were chosen on
MNIST *train* streams (docs/general.md). It is a starting point for
meta-training (clone, then improve), sized for an accelerator: K = 1,000
slots on 7x7 inputs are 59,000 cells (`pretrained:slot_memory`).

Cell units (H = 8; gate pre-activations are written unit by unit below):

    U1, U2  steps of (clock - k / (K - 1)) at +-1/2 step: the window is
            (h_U1 - h_U2) / (2 tanh(tanh 1))
    V       phi(x_a) of the current input
    S       phi(x_a) of slot k's example: written while the window of the
            previous tick is open and F is not yet set
    F       latch: counts the ticks of the window, so S is written once
    D       tanh(tanh(lam (h_V - h_S)))  ~ lam (phi(x_a) - phi(s_ak))
    P+, P-  D tanh(kappa D / 2) split over two output gates ~ kappa D^2 / 2

Messages: layer 1 sends P+ + P- on slot 0 and the window on slot 1; layer 0
carries x on slot 0 and the clock on slot 1; the label comes back on slot 2
of the top's backward message.
"""
from __future__ import annotations

import os
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vsml_jax.config import VSMLConfig
from vsml_jax.learners import Learner, vsml_learner
from vsml_jax.params import CellParams, VSMLParams

HIDDEN = 8
MSG = 4
U1, U2, V, S, F, D, PP, PM = range(HIDDEN)
SAT = 30.0        # a saturated gate: sigmoid(30) is 1.0 in float32
X_MIN = -0.4241   # the blank pixel of `normalize_images` (MNIST and Fashion-MNIST)
# Settings chosen on MNIST train streams (docs/general.md): the squashing
# and the kernel on the mean squared distance of squashed pixels.
SQUASH = 0.3
KERNEL_SCALE = 900.0
KERNEL_SHIFT = 4.0
# Inner scales of the distance units: small enough that tanh is linear to
# ~1% on squashed pixels (|phi| < 0.62), so d_k = LAM^2 MU KAPPA / 2 x the
# mean squared distance.
LAM, MU, KAPPA = 0.2, 1.0, 2.0


def slot_memory_config(num_inputs: int = 49, num_slots: int = 1000,
                       num_classes: int = 10) -> VSMLConfig:
    """The two-layer config: (num_inputs, num_slots, num_classes), a clock of
    1 / (num_slots - 1) per step on slot 1, coordinates, untied layers, labels
    fed back on slot 2, predict then learn, zero initial states."""
    if num_slots < 2:
        raise ValueError(f"slot_memory_config: num_slots={num_slots}; a memory needs "
                         "at least 2 slots (the clock is 1 / (num_slots - 1) per step).")
    return VSMLConfig(
        layer_sizes=(num_inputs, num_slots, num_classes), cell="lstm",
        hidden_size=HIDDEN, msg_size=MSG, micro_ticks=3, backward_interaction=True,
        reduce="mean", input_slot=0, output_slot=0, error_slot=0, feed_label=True,
        label_slot=2, readout_scale=float(num_slots), error_scale=1.0, state_clip=4.0,
        init_std=0.0, tie_layers=False, coordinates=True, protocol="predict_then_learn",
        clock_slot=1, clock_scale=1.0 / (num_slots - 1))


def _zeros() -> Dict[str, np.ndarray]:
    G = 4 * HIDDEN
    return dict(w_h=np.zeros((HIDDEN, G)), w_f=np.zeros((MSG, G)), w_b=np.zeros((MSG, G)),
                bias=np.zeros(G), c_fwd=np.zeros((HIDDEN, MSG)),
                u_bwd=np.zeros((HIDDEN, MSG)), w_coord=np.zeros((3, G)))


# Gate column offsets of unit u: i, f, g, o (the order of `vsml_jax.grid`).
_I, _F, _G, _O = (k * HIDDEN for k in range(4))


def _slot_layer(num_slots: int, squash: float) -> Dict[str, np.ndarray]:
    """V_M of layer 1 (cells (a, k)); see the module doc for the units."""
    p = _zeros()
    delta = 1.0 / (num_slots - 1)      # clock and coordinate per slot
    beta = 20.0 / delta                # the window's edges: 1/20 of a step wide
    h_on = np.tanh(1.0)                # h of a unit whose c is +-1
    kap = SAT / h_on                   # turns h = +-h_on into a +-SAT gate

    def rewrite(u):                    # c = tanh(g pre-activation) every tick
        p["bias"][_I + u], p["bias"][_F + u] = SAT, -SAT

    def output(u):
        p["bias"][_O + u] = SAT

    for u, offset in ((U1, 0.5), (U2, -0.5)):   # tanh(beta (clock - k delta + offset delta))
        rewrite(u), output(u)
        p["w_f"][1, _G + u] = beta
        p["w_coord"][1, _G + u] = -beta
        p["bias"][_G + u] = beta * offset * delta
    rewrite(V)
    for u in (V, S):                  # the same phi(x_a), so h_V - h_S is phi(x_a) - phi(s_ak)
        output(u)
        p["w_f"][0, _G + u], p["bias"][_G + u] = squash, -squash * X_MIN
    for gate, sign in ((_I, 1.0), (_F, -1.0)):   # write: window open and latch not set
        p["w_h"][U1, gate + S], p["w_h"][U2, gate + S] = sign * kap, -sign * kap
        p["w_h"][F, gate + S] = -sign * 2.0 * kap
        p["bias"][gate + S] = -sign * kap * h_on
    output(F)                                    # latch: c += 1 per open tick
    p["bias"][_F + F], p["bias"][_G + F] = SAT, SAT
    p["w_h"][U1, _I + F], p["w_h"][U2, _I + F] = kap, -kap
    p["bias"][_I + F] = -kap * h_on
    rewrite(D), output(D)
    p["w_h"][V, _G + D], p["w_h"][S, _G + D] = LAM, -LAM
    for u, sign in ((PP, 1.0), (PM, -1.0)):      # D sigmoid(+-kappa D) tanh(tanh(+-mu D))
        rewrite(u)
        p["w_h"][D, _G + u] = sign * MU
        p["w_h"][D, _O + u] = sign * KAPPA
        p["c_fwd"][u, 0] = 1.0
    # The window, 1 inside and 0 outside, on forward slot 1.
    both = np.tanh(np.tanh(1.0))
    p["c_fwd"][U1, 1], p["c_fwd"][U2, 1] = 0.5 / both, -0.5 / both
    return p


def _class_layer(gamma: float, shift: float) -> Dict[str, np.ndarray]:
    """V_M of layer 2 (cells (k, c)): unit L holds the label of slot k's
    example and sends it through the output gate sigmoid(z / 2), z = -gamma
    d_k + b0; unit M takes that and sends it through a second sigmoid(z / 2).
    The kernel is their product, sigmoid(z / 2)^2 ~ exp(z) for z << 0: split
    over two gates because a gate computed as (1 + tanh(z / 2)) / 2 (the fast
    kernels) is 0 in float32 below z ~ -17, and early in a stream every stored
    example can be that far (docs/general.md)."""
    p, L, M = _zeros(), 0, 1
    p["w_f"][1, _I + L], p["bias"][_I + L] = 2 * SAT, -SAT    # write inside the window
    p["w_f"][1, _F + L], p["bias"][_F + L] = -2 * SAT, SAT    # keep outside it
    p["w_b"][2, _G + L] = SAT                                 # the label y_c
    p["bias"][_I + M], p["bias"][_F + M] = SAT, -SAT          # M: c = tanh(h_L)
    p["w_h"][L, _G + M] = 1.0
    for u in (L, M):                                          # sigmoid(z / 2)
        p["w_f"][0, _O + u], p["bias"][_O + u] = -gamma / 2.0, shift / 2.0
    p["c_fwd"][M, 0] = 1.0
    return p


def slot_memory_params(cfg: VSMLConfig, squash: float = SQUASH,
                       kernel_scale: float = KERNEL_SCALE,
                       kernel_shift: float = KERNEL_SHIFT) -> VSMLParams:
    """The hand-written V_M (one set per layer) for `slot_memory_config`.

    Args:
      squash: phi(x) = tanh(tanh(squash (x - X_MIN))).
      kernel_scale, kernel_shift: the kernel is sigmoid(z / 2)^2 ~ exp(z), z =
        -kernel_scale x mean_a (phi(x_a) - phi(s_a))^2 + kernel_shift.
    """
    if (cfg.num_layers != 2 or cfg.hidden_size != HIDDEN or cfg.msg_size != MSG
            or cfg.clock_slot != 1 or not cfg.coordinates or cfg.tie_layers):
        raise ValueError("slot_memory_params: build the config with slot_memory_config "
                         f"(got layer_sizes={cfg.layer_sizes}, hidden_size="
                         f"{cfg.hidden_size}, clock_slot={cfg.clock_slot}).")
    gamma = kernel_scale / (LAM ** 2 * MU * KAPPA / 2.0)
    layers = (_slot_layer(cfg.layer_sizes[1], squash), _class_layer(gamma, kernel_shift))
    dtype = jnp.dtype(cfg.dtype)
    cells = CellParams(**{k: jnp.asarray(np.stack([l[k] for l in layers]), dtype)
                          for k in layers[0]})
    return VSMLParams(cells=cells, cfg=cfg)


def squashed(x, squash: float = SQUASH):
    """phi(x) [..., A]: what a slot stores of x."""
    return jnp.tanh(jnp.tanh(squash * (jnp.asarray(x) - X_MIN)))


def rule_scores(stored, labels, x, squash: float = SQUASH,
                kernel_scale: float = KERNEL_SCALE,
                kernel_shift: float = KERNEL_SHIFT):
    """The rule the learner runs, written directly: scores [C] of input x [A]
    given stored examples [N, A] (the first N <= K of the stream) with one-hot
    labels [N, C]: sum over stored examples of class c of
    sigmoid(z / 2)^2, z = -kernel_scale x mean_a (phi(x_a) - phi(s_a))^2 +
    kernel_shift, up to the learner's constant factor tanh(1)."""
    d = jnp.mean((squashed(x, squash)[None] - squashed(stored, squash)) ** 2, axis=-1)
    kernel = jax.nn.sigmoid((kernel_shift - kernel_scale * d) / 2.0) ** 2
    return kernel @ labels


def slot_memory_learner(num_inputs: int = 49, num_slots: int = 1000,
                        num_classes: int = 10) -> Tuple[Learner, VSMLParams]:
    """(the VS-ML Learner, its hand-written V_M) with the settings above."""
    cfg = slot_memory_config(num_inputs, num_slots, num_classes)
    return vsml_learner(cfg), slot_memory_params(cfg)


def save_pretrained(path_prefix: str = None) -> Tuple[str, str]:
    """Writes the learner as `pretrained:slot_memory` (7x7 inputs, 1,000 slots):
    <prefix>.msgpack + <prefix>.json, by default in vsml_jax/pretrained/.

        python -c "from vsml_jax import slot_memory; slot_memory.save_pretrained()"
    """
    from vsml_jax import pretrained
    from vsml_jax.training import checkpointing
    if path_prefix is None:
        path_prefix = os.path.join(os.path.dirname(pretrained.__file__), "slot_memory")
    learner, params = slot_memory_learner()
    extra = {"input": {"pool": 4, "input_size": learner.config.input_size},
             "construction": {
                 "module": "vsml_jax.slot_memory", "meta_learned": False,
                 "squash": SQUASH, "kernel_scale": KERNEL_SCALE,
                 "kernel_shift": KERNEL_SHIFT,
                 "how": "V_M written by hand (slot_memory_params): an online Parzen "
                        "window over the first num_slots examples; settings chosen on "
                        "MNIST train streams (docs/general.md)."}}
    return checkpointing.save_learner(path_prefix, params, pretrained.config_dict(learner),
                                      extra, learner=learner.name)
