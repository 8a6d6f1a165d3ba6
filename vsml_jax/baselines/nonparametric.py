"""Non-parametric online classifiers: reference points for how fast a learner
*can* learn from raw inputs.

Both store what the stream has shown and classify by distance, with nothing
meta-learned and nothing to tune:

- `nearest_mean_learner`: nearest class mean (Euclidean). Its decision
  argmax_c (2 x . mu_c - |mu_c|^2) is a sum of per-input terms, i.e. it lies
  in the class a single VS-ML layer can express (every output there is a sum
  over inputs a of what cell (a, b) sends), so it is the natural "few-shot"
  yardstick for a one-layer learned learner.
- `nearest_neighbour_learner`: 1-nearest neighbour (Euclidean) over every
  example seen so far, the classic memory-based learner.
- `parzen_learner`: the Parzen window (kernel class mean): class c scores
  log((1/n_c) sum_i k(x, x_i)) over its stored examples, with the Gaussian
  kernel k = exp(-|x - x_i|^2 / (2 h^2 D)). Between the two above: h -> inf
  ranks classes like the nearest mean, h -> 0 like the nearest neighbour. It
  has one setting, the bandwidth h (in units of the per-input RMS distance);
  it is a reference for how far a memory-based rule without learned features
  gets, not a learner a single VS-ML layer can express.

They follow the online protocol of every other learner here: step t predicts
y_t from the examples before t, then stores (x_t, y_t). As `Learner`s they
have no meta variables (params is None).

Scores: logits_c = -(squared distance to class c's mean, or to the nearest
stored example of class c) / D, or Parzen's log kernel mean, so argmax is the
classifier's decision; a
class not seen yet scores one below the lowest seen score (all score zero
before the first example). The reported loss is the softmax cross-entropy of these
scores, a by-product, not a calibrated probability.

    learner = nearest_neighbour_learner(784, memory_size=2000)
    state, out = learner.unroll(None, learner.init_state(key), (x [T, D], y [T, C]))
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from vsml_jax.learners import Learner, check_inputs, check_stream
from vsml_jax.network import StepOutput, correct_from_logits

METHODS = ("nearest_mean", "nearest_neighbour", "parzen")
# The methods that keep every example in a memory of memory_size rows.
MEMORY_METHODS = ("nearest_neighbour", "parzen")
# Parzen's default bandwidth, a compromise between the start and the end of a
# stream: on 10 streams of 2,000 MNIST *train* examples at 7x7
# (docs/measured/memory_rules/streams.md) it is 0.5 points below the best of
# 0.05 ... 0.2 at N = 100 (0.2) and 1.1 points below the best mean accuracy
# over the stream (0.1).
DEFAULT_BANDWIDTH = 0.15


@dataclasses.dataclass(frozen=True)
class NonparametricConfig:
    """Attributes:
      num_inputs: D.
      num_classes: C.
      method: "nearest_mean", "nearest_neighbour" or "parzen".
      memory_size: examples the nearest-neighbour / Parzen memory holds (its
        state is [memory_size, D]); a stream must not feed more. Unused by
        nearest_mean.
      bandwidth: Parzen's kernel width h (> 0; see the module doc). Unused by
        the other methods.
    """
    num_inputs: int
    num_classes: int = 10
    method: str = "nearest_mean"
    memory_size: int = 2000
    bandwidth: float = DEFAULT_BANDWIDTH

    # Inputs [T, K, D] are K examples per step, all predicted and then stored.
    native_minibatch = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"NonparametricConfig: method={self.method!r}; use one of "
                             f"{', '.join(METHODS)}.")
        if self.num_inputs < 1 or self.num_classes < 2 or self.memory_size < 1:
            raise ValueError(
                f"NonparametricConfig: num_inputs={self.num_inputs}, num_classes="
                f"{self.num_classes}, memory_size={self.memory_size} must be >= 1, >= 2, "
                ">= 1.")
        if not self.bandwidth > 0:
            raise ValueError(f"NonparametricConfig: bandwidth={self.bandwidth}; the Parzen "
                             "kernel width must be > 0 (e.g. 0.15).")

    @property
    def input_size(self) -> int:
        return self.num_inputs


@struct.dataclass
class NonparametricState:
    """What has been stored.

    nearest_mean: sums [C, D] and counts [C] per class (memory unused, [0, D]).
    nearest_neighbour, parzen: memory [M, D], labels int32 [M], count [] (slots
    >= count are empty); sums / counts hold the class counts only (sums [C, 0]).
    """
    sums: jax.Array
    counts: jax.Array
    memory: jax.Array
    memory_labels: jax.Array
    count: jax.Array


def init_state(cfg: NonparametricConfig) -> NonparametricState:
    """Empty memory. No randomness: these learners start the same every episode."""
    D, C = cfg.num_inputs, cfg.num_classes
    knn = cfg.method in MEMORY_METHODS
    M = cfg.memory_size if knn else 0
    return NonparametricState(
        sums=jnp.zeros((C, 0 if knn else D), jnp.float32),
        counts=jnp.zeros((C,), jnp.float32),
        memory=jnp.zeros((M, D), jnp.float32),
        memory_labels=jnp.zeros((M,), jnp.int32),
        count=jnp.zeros((), jnp.int32))


def scores(cfg: NonparametricConfig, state: NonparametricState, x: jax.Array) -> jax.Array:
    """Logits [N, C] for inputs x [N, D] (see the module doc); state unchanged."""
    check_inputs(f"{cfg.method} predict", x, cfg.num_inputs)
    x = x.astype(jnp.float32)
    if cfg.method == "nearest_mean":
        means = state.sums / jnp.maximum(state.counts, 1.0)[:, None]              # [C, D]
        d2 = _squared_distances(x, means)                                       # [N, C]
        logits = -d2 / cfg.num_inputs
    else:
        filled = jnp.arange(state.memory.shape[0]) < state.count                # [M]
        d2_all = jnp.where(filled[:, None], _squared_distances(state.memory, x),
                           jnp.inf)                                             # [M, N]
        # Per class, a segment reduction over the memory (no [N, M, C]
        # temporary; the held-out set can have N = 1,000s).
        if cfg.method == "nearest_neighbour":
            logits = -jax.ops.segment_min(d2_all, state.memory_labels,
                                          num_segments=cfg.num_classes).T / cfg.num_inputs
        else:
            logits = _parzen_logits(cfg, state, d2_all)
    seen = state.counts > 0                                                      # [C]
    floor = jnp.min(jnp.where(seen[None], logits, jnp.inf), axis=-1, keepdims=True)
    # Unseen classes rank below every seen one (one below the lowest seen score).
    floor = jnp.where(jnp.isfinite(floor), floor - 1.0, 0.0)
    return jnp.where(seen[None], logits, floor)


def _parzen_logits(cfg: NonparametricConfig, state: NonparametricState,
                   d2_all: jax.Array) -> jax.Array:
    """log((1/n_c) sum_{i in c} exp(-d2_i / (2 h^2 D))) [N, C] from the squared
    distances d2_all [M, N] (inf for empty slots): a log-sum-exp per class,
    shifted by the class's largest term (the kernel values themselves
    underflow: at h = 0.15 a typical pair gives exp(-13))."""
    log_k = -d2_all / (2.0 * cfg.bandwidth ** 2 * cfg.num_inputs)               # [M, N]
    labels, C = state.memory_labels, cfg.num_classes
    top = jax.ops.segment_max(log_k, labels, num_segments=C)                    # [C, N]
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # classes with no example yet
    total = jax.ops.segment_sum(jnp.exp(log_k - top[labels]), labels, num_segments=C)
    logits = top + jnp.log(total) - jnp.log(jnp.maximum(state.counts, 1.0))[:, None]
    return logits.T  # unseen classes (-inf here) are floored by `scores`


def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """|a_i - b_j|^2 [I, J] for a [I, D], b [J, D], as |a|^2 + |b|^2 - 2 a.b:
    a matmul instead of an [I, J, D] temporary."""
    d2 = (jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None]
          - 2.0 * jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST))
    return jnp.maximum(d2, 0.0)


def store(cfg: NonparametricConfig, state: NonparametricState, x: jax.Array,
          y: jax.Array) -> NonparametricState:
    """Adds K examples x [K, D] with one-hot labels y [K, C] to the state."""
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    counts = state.counts + jnp.sum(y, axis=0)
    if cfg.method == "nearest_mean":
        return state.replace(sums=state.sums + y.T @ x, counts=counts,
                             count=state.count + x.shape[0])
    memory = jax.lax.dynamic_update_slice(state.memory, x, (state.count, 0))
    labels = jax.lax.dynamic_update_slice(state.memory_labels,
                                          jnp.argmax(y, -1).astype(jnp.int32), (state.count,))
    return state.replace(counts=counts, memory=memory, memory_labels=labels,
                         count=state.count + x.shape[0])


def unroll(cfg: NonparametricConfig, state: NonparametricState,
           data: Tuple[jax.Array, jax.Array]) -> Tuple[NonparametricState, StepOutput]:
    """Predict-then-store over a stream.

    Args:
      data: (inputs [T, D], one-hot labels [T, C]) or ([T, K, D], [T, K, C]).
    Returns:
      (final state, StepOutput with logits [T, (K,) C], loss [T, (K)],
      correct [T, (K)]); step t predicts from the examples before t only.
    """
    inputs, labels = data
    check_stream(cfg.method, inputs, labels, cfg.num_inputs, cfg.num_classes,
                 minibatch=True)
    batched = inputs.ndim == 3
    if not batched:
        inputs, labels = inputs[:, None], labels[:, None]
    T, K = inputs.shape[:2]
    if cfg.method in MEMORY_METHODS and T * K > cfg.memory_size:
        raise ValueError(f"{cfg.method}: the stream feeds {T * K} examples but "
                         f"memory_size={cfg.memory_size}; build the learner with "
                         f"memory_size >= {T * K}.")

    def body(state, xy):
        x, y = xy                                                        # [K, D], [K, C]
        logits = scores(cfg, state, x)
        out = StepOutput(logits=logits, loss=optax.softmax_cross_entropy(logits, y),
                         correct=correct_from_logits(logits, y, jnp.float32))
        return store(cfg, state, x, y), out

    state, out = jax.lax.scan(body, state, (inputs, labels))
    if not batched:
        out = jax.tree_util.tree_map(lambda a: a[:, 0], out)
    return state, out


def nonparametric_learner(num_inputs: int, num_classes: int = 10, *,
                          method: str = "nearest_mean", memory_size: int = 2000,
                          bandwidth: float = DEFAULT_BANDWIDTH) -> Learner:
    """A `NonparametricConfig` as a Learner named after its method."""
    cfg = NonparametricConfig(num_inputs=num_inputs, num_classes=num_classes,
                              method=method, memory_size=memory_size, bandwidth=bandwidth)
    unroll_fn, predict_fn = _functions(cfg)
    return Learner(name=method, init_params=lambda key: None,
                   init_state=lambda key: init_state(cfg), unroll=unroll_fn,
                   config=cfg, predict=predict_fn)


def nearest_mean_learner(num_inputs: int, num_classes: int = 10) -> Learner:
    """Online nearest-class-mean classifier (see the module doc)."""
    return nonparametric_learner(num_inputs, num_classes, method="nearest_mean")


def nearest_neighbour_learner(num_inputs: int, num_classes: int = 10, *,
                              memory_size: int = 2000) -> Learner:
    """Online 1-nearest-neighbour classifier holding up to memory_size examples."""
    return nonparametric_learner(num_inputs, num_classes, method="nearest_neighbour",
                                 memory_size=memory_size)


def parzen_learner(num_inputs: int, num_classes: int = 10, *, memory_size: int = 2000,
                   bandwidth: float = DEFAULT_BANDWIDTH) -> Learner:
    """Online Parzen window (Gaussian kernel class mean; see the module doc)."""
    return nonparametric_learner(num_inputs, num_classes, method="parzen",
                                 memory_size=memory_size, bandwidth=bandwidth)


@functools.lru_cache(maxsize=None)
def _functions(cfg: NonparametricConfig) -> Tuple[Callable, Callable]:
    """(unroll, predict) function objects shared per config, so that jit caches
    keyed on the function (evaluation._runner) are reused."""
    return (lambda params, state, data: unroll(cfg, state, data),
            lambda params, state, inputs: scores(cfg, state, inputs))
