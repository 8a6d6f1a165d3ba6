"""Online backpropagation baselines: a small classifier trained one example per step.

The network is y = W x + b (softmax cross-entropy), optionally with hidden
layers, or the `tanh_linear` network y = tanh(x) W + b of the backprop-cloning
experiment (paper sec. 3.1). It is trained online with an optax optimizer
(Adam or SGD). Each step predicts y_t with the parameters from *before* y_t is
seen and only then takes one gradient step on (x_t, y_t), exactly the online
protocol of the VS-ML learners, so cumulative online accuracies are
comparable.

As a `vsml_jax.learners.Learner` it has no meta variables (`params` is None):
the network weights and the optimizer state live in the per-episode state.
With inputs [T, K, D] each step is a minibatch of K examples (mean gradient),
the counterpart of VS-ML's batch-averaged states.

    learner = online_gd_learner(49, 10, optimizer="adam", learning_rate=1e-3)
    state = learner.init_state(key)
    state, out = learner.unroll(None, state, (inputs [T, D], labels [T, C]))
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from vsml_jax.learners import Learner, check_inputs, check_stream
from vsml_jax.network import StepOutput, correct_from_logits

OPTIMIZERS = ("adam", "sgd")
ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh}


@dataclasses.dataclass(frozen=True)
class OnlineGDConfig:
    """An online-trained classifier.

    Attributes:
      num_inputs: D.
      num_classes: C.
      hidden_sizes: widths of hidden layers; () is the single-layer y = W x + b.
      activation: hidden-layer nonlinearity, "relu" or "tanh".
      input_tanh: apply tanh to the input first: y = tanh(x) W + b, the network
        the backprop-cloning experiment implements (sec. 3.1).
      optimizer: "adam" or "sgd" (plain, no momentum).
      learning_rate: step size of the optimizer.
      init_scale: weights start N(0, init_scale^2 / fan_in); 0 starts at zero.
      init_std: if set, weights start N(0, init_std^2) in every layer instead
        (as a cloned learner's stored weights do, see cloning.stacked_clone_config).
        Biases start at zero.
    """
    num_inputs: int
    num_classes: int = 10
    hidden_sizes: Tuple[int, ...] = ()
    activation: str = "relu"
    input_tanh: bool = False
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    init_scale: float = 1.0
    init_std: Optional[float] = None

    # Evaluation reads this: inputs [T, K, D] are a minibatch of K per step
    # for one network, so the state needs no extra stream axis.
    native_minibatch = True

    def __post_init__(self):
        object.__setattr__(self, "hidden_sizes", tuple(int(n) for n in self.hidden_sizes))
        def bad(msg):
            raise ValueError(f"OnlineGDConfig: {msg}")
        if self.num_inputs < 1 or self.num_classes < 2:
            bad(f"num_inputs={self.num_inputs} must be >= 1 and num_classes="
                f"{self.num_classes} >= 2.")
        if any(n < 1 for n in self.hidden_sizes):
            bad(f"hidden_sizes={self.hidden_sizes} must be positive.")
        if self.activation not in ACTIVATIONS:
            bad(f"activation={self.activation!r} is unknown; use one of "
                f"{tuple(ACTIVATIONS)}.")
        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer={self.optimizer!r} is unknown; use one of {OPTIMIZERS}.")
        if not self.learning_rate >= 0:
            bad(f"learning_rate={self.learning_rate} must be >= 0.")
        if self.init_scale < 0:
            bad(f"init_scale={self.init_scale} must be >= 0.")
        if self.init_std is not None and self.init_std < 0:
            bad(f"init_std={self.init_std} must be >= 0.")

    @property
    def layer_sizes(self) -> Tuple[int, ...]:
        return (self.num_inputs,) + self.hidden_sizes + (self.num_classes,)

    def replace(self, **changes) -> "OnlineGDConfig":
        return dataclasses.replace(self, **changes)


@struct.dataclass
class OnlineGDState:
    """Per-episode state: the network `net` ({"w": [[D_in, D_out]...], "b": [...]})
    and the optimizer state `opt_state`."""
    net: Dict[str, Any]
    opt_state: Any


def make_optimizer(cfg: OnlineGDConfig) -> optax.GradientTransformation:
    """Adam or SGD with the learning rate kept in the optimizer state.

    `inject_hyperparams` stores the learning rate in the state, so the traced
    update does not depend on it: learners that differ only in their learning
    rate share one compiled program (a sweep compiles once).
    """
    base = optax.adam if cfg.optimizer == "adam" else optax.sgd
    return optax.inject_hyperparams(base)(learning_rate=cfg.learning_rate)


def init_net(key: jax.Array, cfg: OnlineGDConfig) -> Dict[str, List[jax.Array]]:
    """Weights N(0, init_scale^2 / fan_in) (or N(0, init_std^2)) and zero biases,
    one pair per layer."""
    sizes = cfg.layer_sizes
    keys = jax.random.split(key, len(sizes) - 1)
    # Drawn flat then reshaped: the same numbers (threefry is partitionable by
    # default), and XLA on CPU compiles a 1-D draw several times faster than a
    # [D, 10] one.
    std = lambda n_in: cfg.init_scale / np.sqrt(n_in) if cfg.init_std is None else cfg.init_std
    ws = [std(n_in) *
          jax.random.normal(k, (n_in * n_out,), jnp.float32).reshape(n_in, n_out)
          for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:])]
    bs = [jnp.zeros((n,), jnp.float32) for n in sizes[1:]]
    return {"w": ws, "b": bs}


def apply_net(cfg: OnlineGDConfig, net: Dict[str, List[jax.Array]], x: jax.Array) -> jax.Array:
    """Logits [..., C] for inputs x [..., D]."""
    h = jnp.tanh(x) if cfg.input_tanh else x
    act = ACTIVATIONS[cfg.activation]
    last = len(net["w"]) - 1
    for i, (w, b) in enumerate(zip(net["w"], net["b"])):
        h = h @ w + b
        if i < last:
            h = act(h)
    return h


def init_state(key: jax.Array, cfg: OnlineGDConfig) -> OnlineGDState:
    net = init_net(key, cfg)
    return OnlineGDState(net=net, opt_state=make_optimizer(cfg).init(net))


def unroll(cfg: OnlineGDConfig, state: OnlineGDState, data: Tuple[jax.Array, jax.Array]
           ) -> Tuple[OnlineGDState, StepOutput]:
    """Predict-then-update over a stream.

    Args:
      cfg: the network and optimizer.
      state: from `init_state`.
      data: (inputs [T, D], one-hot labels [T, C]) or ([T, K, D], [T, K, C]) for
        a minibatch of K examples per step.
    Returns:
      (final state, StepOutput with logits [T, (K,) C], loss [T, (K)],
      correct [T, (K)]); step t's outputs use the parameters before step t's update.
    """
    inputs, labels = data
    check_stream("online GD", inputs, labels, cfg.num_inputs, cfg.num_classes,
                 minibatch=True)
    tx = make_optimizer(cfg)  # its update reads the learning rate from state.opt_state

    def loss_fn(net, x, y):
        logits = apply_net(cfg, net, x)
        losses = optax.softmax_cross_entropy(logits, y)
        return jnp.mean(losses), (logits, losses)

    def body(state, xy):
        x, y = xy
        (_, (logits, losses)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.net, x, y)
        updates, opt_state = tx.update(grads, state.opt_state, state.net)
        net = optax.apply_updates(state.net, updates)
        correct = correct_from_logits(logits, y, jnp.float32)
        return OnlineGDState(net=net, opt_state=opt_state), StepOutput(
            logits=logits, loss=losses, correct=correct)

    return jax.lax.scan(body, state, (inputs.astype(jnp.float32), labels.astype(jnp.float32)))


def online_gd_learner(num_inputs: int, num_classes: int = 10, *, optimizer: str = "adam",
                      learning_rate: float = 1e-3, hidden_sizes: Sequence[int] = (),
                      name: str = "", **config_fields) -> Learner:
    """Online backprop (Adam or SGD) as a Learner with no meta variables.

    `config_fields` go to `OnlineGDConfig` (activation, input_tanh, init_scale).
    The default name is the optimizer ("adam"/"sgd"), with "_mlp" if hidden.
    """
    cfg = OnlineGDConfig(num_inputs=num_inputs, num_classes=num_classes,
                         hidden_sizes=tuple(hidden_sizes), optimizer=optimizer,
                         learning_rate=learning_rate, **config_fields)
    return learner_from_config(cfg, name=name)


def learner_from_config(cfg: OnlineGDConfig, name: str = "") -> Learner:
    """The Learner for an `OnlineGDConfig`."""
    default = cfg.optimizer + ("_mlp" if cfg.hidden_sizes else "")
    without_lr = cfg.replace(learning_rate=0.0)
    return Learner(name=name or default, init_params=lambda key: None,
                   init_state=lambda key: init_state(key, cfg),
                   unroll=_shared_unroll(without_lr),
                   config=cfg, predict=_shared_predict(without_lr))


@functools.lru_cache(maxsize=None)
def _shared_unroll(cfg_without_lr: OnlineGDConfig) -> Callable:
    """One unroll function object per config up to the learning rate (which the
    state carries), so jit caches keyed on the function are shared."""
    return lambda params, state, data: unroll(cfg_without_lr, state, data)


@functools.lru_cache(maxsize=None)
def _shared_predict(cfg_without_lr: OnlineGDConfig) -> Callable:
    """Learner.predict: logits [N, C] of the current network for inputs [N, D].

    Shared per config up to the learning rate, like `_shared_unroll`. The state
    has no stream axis even after minibatch steps (one network learns from K
    examples per step).
    """
    def predict(params, state, inputs):
        check_inputs("online GD predict", inputs, cfg_without_lr.num_inputs)
        return apply_net(cfg_without_lr, state.net, inputs.astype(jnp.float32))

    return predict


def tanh_linear_learner(num_inputs: int, num_classes: int = 10, *,
                        learning_rate: float = 1e-2, init_scale: float = 1.0,
                        hidden_sizes: Sequence[int] = (),
                        init_std: Optional[float] = None) -> Learner:
    """y = tanh(x) W + b trained by plain online SGD (the network cloned in sec. 3.1).

    With hidden_sizes (n1, ...) it is the stack of such layers that stacked
    clones implement: y = tanh(... tanh(tanh(x) W1 + b1) ...) Wl + bl.
    """
    cfg = OnlineGDConfig(num_inputs=num_inputs, num_classes=num_classes, input_tanh=True,
                         hidden_sizes=tuple(hidden_sizes), activation="tanh",
                         optimizer="sgd", learning_rate=learning_rate, init_scale=init_scale,
                         init_std=init_std)
    return learner_from_config(cfg, name="tanh_sgd")


def count_network_params(cfg: OnlineGDConfig) -> int:
    """Number of weights and biases of the trained network."""
    sizes = cfg.layer_sizes
    return int(sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:])))
