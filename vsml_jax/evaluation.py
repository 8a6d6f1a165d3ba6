"""Meta-testing: run learners on identical online streams and measure how they learn.

A stream is a sequence of T test examples in random order (no label
permutation at meta-test). Seed s gives the same stream to every method, and
the learner's initial state is drawn from the same seed, so methods differ
only in how they learn:

    streams = make_streams(dataset, seeds, length)        # indices [S, T] into dataset
    out = evaluate_learner(learner, params, streams, seeds)  # StepOutput [S, T, ...]
    per_seed = online_metrics(out)                        # {"cum_acc@100": [S], ...}
    summary = summarize(per_seed)                         # {"cum_acc@100": {"mean", "std"}}

With `stream_batch=K` every step feeds K examples ([S, T, K, D]): K copies of
a VS-ML learner whose states are averaged after every step (the paper's
batching), or a minibatch of K for online gradient descent.

Held-out test curves (fig. 5): with `held_out=(inputs [N, D], labels [N])`
the stream runs in pieces and after step 0 and every `held_out_every` steps
each seed's current state classifies the N held-out inputs
(`Learner.predict`, which learns nothing from them):

    run = evaluate_learner(learner, params, streams, seeds,
                           held_out=(x_test, y_test), held_out_every=500)
    run.out, run.test_steps, run.test_acc     # StepOutput, [E], [S, E]

Metrics (per seed, then mean and std over seeds):
  cum_acc@n        cumulative online accuracy: the fraction of correct
                   predictions among the first n steps (the fig. 6 y axis)
  final_window_acc accuracy over the last `window` steps
  mean_loss        mean online cross-entropy over the stream
  test_acc@n       held-out accuracy of the state after n steps (if measured)
  test_acc_final   held-out accuracy at the end of the stream
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from vsml_jax.baselines import meta_rnn, online_gd
from vsml_jax.config import VSMLConfig
from vsml_jax.data import Dataset
from vsml_jax.learners import Learner
from vsml_jax.network import StepOutput, init_state_for_streams
from vsml_jax.params import count_meta_variables
from vsml_jax.state import VSMLState, count_learned_variables

DEFAULT_CHECKPOINTS = (100, 500, 1000, 2000)
DEFAULT_WINDOW = 100

Streams = Any  # IndexedStreams or (inputs [S, T, (K,) D], labels [S, T, (K,) C])


# ------------------------------------------------------------------ keys
def init_key(seed) -> jax.Array:
    """Key of seed s's initial learner state (shared by every method)."""
    return jax.random.fold_in(jax.random.key(seed), 1)


# --------------------------------------------------------------- streams
@dataclasses.dataclass(frozen=True)
class IndexedStreams:
    """S streams of T steps (K examples each if stream_batch) as indices into a
    dataset, gathered a piece at a time so long or wide streams stay small.

    Attributes:
      data: the dataset (images [N, D], labels [N]).
      indices: numpy int32 [S, T] or [S, T, K].
    """
    data: Dataset
    indices: np.ndarray

    @property
    def num_steps(self) -> int:
        return self.indices.shape[1]

    def slice(self, start: int, stop: int) -> Tuple[jax.Array, jax.Array]:
        """(inputs [S, stop-start, (K,) D], one-hot labels [S, stop-start, (K,) C])."""
        return _gather(self.data, self.indices[:, start:stop])

    def materialize(self) -> Tuple[jax.Array, jax.Array]:
        """All inputs and labels at once."""
        return self.slice(0, self.num_steps)


@jax.jit
def _gather(data: Dataset, idx: jax.Array) -> Tuple[jax.Array, jax.Array]:
    return data.images[idx], jax.nn.one_hot(data.labels[idx], data.num_classes,
                                            dtype=jnp.float32)


def stream_indices(seed: int, num_examples: int, count: int) -> np.ndarray:
    """[count] example indices in random order for seed `seed`: without
    replacement while count <= num_examples, uniformly with replacement beyond.

    Drawn with numpy from SeedSequence((seed, 0)): a stream is fixed data, not
    part of any computation, so it needs no compiled program.
    """
    rng = np.random.default_rng((int(seed), 0))
    if count <= num_examples:
        return rng.permutation(num_examples)[:count].astype(np.int32)
    return rng.integers(0, num_examples, count).astype(np.int32)


def held_out_set(data: Dataset, n: int) -> Tuple[jax.Array, jax.Array]:
    """(images [n, D], labels [n]): the first n examples of `data`, the fixed
    held-out set a learner is tested on. From a mixture of P data sets, the
    first n // P of each (the first n % P data sets give one more), so every
    data set is tested. ValueError if data (or a data set of it) has fewer."""
    if n > data.num_examples:
        raise ValueError(f"{n} held-out examples asked for, but the split has only "
                         f"{data.num_examples}; lower --test_examples.")
    if not data.parts:
        return data.images[:n], data.labels[:n]
    P = len(data.parts)
    rows = []
    for i, (part, start) in enumerate(zip(data.parts, data.part_offsets())):
        k = n // P + (i < n % P)
        if k > part.size:
            raise ValueError(f"{k} held-out examples asked for from {part.name}, which "
                             f"has only {part.size}; lower --test_examples.")
        rows.append(np.arange(start, start + k))
    idx = np.concatenate(rows)
    return data.images[idx], data.labels[idx]


def describe_dataset(data: Dataset) -> Dict[str, Any]:
    """A JSON-ready account of a Dataset: name, source (what was read),
    num_classes, num_examples, input_size and, for a mixture, its parts."""
    out = {"name": data.name, "source": data.source, "num_classes": data.num_classes,
           "num_examples": data.num_examples, "input_size": data.input_dim}
    if data.parts:
        out["parts"] = [p._asdict() for p in data.parts]
    return out


def _stream_of_seed(data: Dataset, seed: int, count: int) -> np.ndarray:
    """[count] indices of seed s's stream: from a mixture, all from one of its
    data sets, chosen uniformly from SeedSequence((seed, 1))."""
    if not data.parts:
        return stream_indices(seed, data.num_examples, count)
    part = int(np.random.default_rng((int(seed), 1)).integers(len(data.parts)))
    start = int(data.part_offsets()[part])
    return start + stream_indices(seed, data.parts[part].size, count)


def make_streams(data: Dataset, seeds: Sequence[int], length: int,
                 stream_batch: int = 0) -> IndexedStreams:
    """One random stream per seed, no label permutation.

    Args:
      data: images [N, D], labels [N]. From a mixture (`vsml_jax.data.
        make_mixture`) each seed's stream comes from one of its data sets,
        chosen at random per seed.
      seeds: S non-negative integers (seed s always gives the same stream of `data`).
      length: T steps.
      stream_batch: K > 0 feeds K examples per step.
    Returns:
      IndexedStreams with indices [S, T] (or [S, T, K]); `.materialize()` gives
      inputs [S, T, (K,) D] and one-hot labels [S, T, (K,) C].
    """
    if length < 1:
        raise ValueError(f"length={length} must be >= 1.")
    if not len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds={list(seeds)}: give at least one seed, all >= 0.")
    k = max(stream_batch, 1)
    idx = np.stack([_stream_of_seed(data, s, length * k) for s in seeds])
    if stream_batch:
        idx = idx.reshape(len(seeds), length, k)
    return IndexedStreams(data=data, indices=idx)


def init_states(learner: Learner, seeds: Sequence[int], stream_batch: int = 0) -> Any:
    """Initial states [S, ...] (with K streams per step: VS-ML states [S, K, ...])."""
    states = _init_states(learner.init_state, jnp.asarray(seeds))
    if not stream_batch:
        return states
    if isinstance(states, VSMLState):
        return jax.vmap(lambda s: init_state_for_streams(s, stream_batch))(states)
    if getattr(learner.config, "native_minibatch", False):
        return states  # one network, K examples per step: no extra axis
    raise ValueError(f"learner {learner.name!r} does not define batch-averaged streams "
                     f"(stream_batch={stream_batch}); use stream_batch=0 for it.")


def _init_states(init_state: Callable, seeds: jax.Array) -> Any:
    # Not jitted as a whole: run eagerly, its primitives (e.g. random.normal)
    # hit compilation caches shared by every learner with the same shapes.
    return jax.vmap(lambda s: init_state(init_key(s)))(seeds)


# ------------------------------------------------------------- running
@functools.lru_cache(maxsize=64)
def _runner(unroll: Callable) -> Callable:
    """jit(vmap over seeds) of an unroll function, cached per function object."""
    return jax.jit(jax.vmap(unroll, in_axes=(None, 0, 0)))


@functools.lru_cache(maxsize=64)
def _tester(predict: Callable) -> Callable:
    """jit of (params, states [S, ...], inputs [N, D], labels [N]) -> held-out
    accuracy [S], vmapped over the seeds' states; cached per predict function."""
    def accuracy(params, state, inputs, labels):
        logits = predict(params, state, inputs)
        return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return jax.jit(jax.vmap(accuracy, in_axes=(None, 0, None, None)))


@dataclasses.dataclass
class HeldOutRun:
    """What `evaluate_learner` returns when given held-out data.

    Attributes:
      out: the online StepOutput, exactly as without held-out data.
      test_steps: int [E], steps after which the held-out set was classified
        (0, held_out_every, 2 held_out_every, ..., and T).
      test_acc: [S, E] held-out accuracy of each seed's state at those steps.
    """
    out: StepOutput
    test_steps: np.ndarray
    test_acc: np.ndarray


def _held_out_arrays(learner: Learner, held_out: Tuple[Any, Any], width: int
                     ) -> Tuple[jax.Array, jax.Array]:
    """(inputs [N, D] float32, integer labels [N]) from held_out, checked."""
    if learner.predict is None:
        raise ValueError(f"learner {learner.name!r} defines no `predict`, so held-out "
                         "accuracy cannot be measured for it; give it a Learner.predict "
                         "or leave held_out=None.")
    inputs, labels = held_out
    inputs, labels = jnp.asarray(inputs, jnp.float32), jnp.asarray(labels)
    if labels.ndim == 2:  # one-hot
        labels = jnp.argmax(labels, axis=-1)
    if inputs.ndim != 2 or inputs.shape[1] != width or labels.shape != inputs.shape[:1]:
        raise ValueError(f"held_out has inputs {tuple(inputs.shape)} and labels "
                         f"{tuple(labels.shape)}; expected inputs [N, {width}] (the "
                         "streams' width) and labels [N] or one-hot [N, C].")
    return inputs, labels.astype(jnp.int32)


def _piece_ends(T: int, chunk: int, every: int) -> list:
    """Steps where a piece of the stream ends: every multiple of `chunk` (for
    progress lines and bounded memory) or `every` (a held-out test), and T."""
    return sorted({*range(chunk, T, chunk), *range(every, T, every), T})


def evaluate_learner(learner: Learner, params: Any, streams: Streams, seeds: Sequence[int],
                     *, stream_batch: int = 0, chunk_size: Optional[int] = None,
                     log: Optional[Callable[[str], None]] = None,
                     held_out: Optional[Tuple[Any, Any]] = None,
                     held_out_every: Optional[int] = None
                     ) -> Union[StepOutput, HeldOutRun]:
    """Runs `learner` on every stream, all seeds at once (jit + vmap).

    Args:
      learner: any Learner (with `predict` if held_out is given).
      params: its meta variables (shared by all streams).
      streams: `IndexedStreams` from `make_streams`, or arrays (inputs
        [S, T, (K,) D], one-hot labels [S, T, (K,) C]).
      seeds: the S seeds of the streams (they also seed the initial states).
      stream_batch: K if the streams carry K examples per step, else 0.
      chunk_size: run T in pieces of this many steps (carrying the state), so
        long streams report progress through `log`; the result is identical.
      log: called with a progress line after each piece (if T > chunk_size)
        and after each held-out test.
      held_out: optional (inputs [N, D], labels [N] or one-hot [N, C]): test
        data that the learners classify but never learn from.
      held_out_every: test on held_out after step 0, every this many steps
        and after step T (None: after step 0 and T only). Pieces end at the
        multiples of chunk_size and of held_out_every; the online outputs are
        the same as without held-out data.
    Returns:
      Without held_out, StepOutput as numpy arrays: logits [S, T, (K,) C],
      loss [S, T, (K)], correct [S, T, (K)]. With held_out, a `HeldOutRun`
      holding that StepOutput and the held-out curve.
    """
    if isinstance(streams, IndexedStreams):
        get, lead = streams.slice, streams.indices.shape
        expected_ndim = 3 if stream_batch else 2
        width = streams.data.images.shape[-1]
    else:
        inputs, labels = streams
        get = lambda a, b: (inputs[:, a:b], labels[:, a:b])
        lead, expected_ndim = inputs.shape, 4 if stream_batch else 3
        width = inputs.shape[-1]
    if lead[0] != len(seeds):
        raise ValueError(f"{lead[0]} streams but {len(seeds)} seeds; give one "
                         "seed per stream.")
    if len(lead) != expected_ndim:
        raise ValueError(f"streams have shape {tuple(lead)}; with stream_batch="
                         f"{stream_batch} expected [S, T{', K' if stream_batch else ''}"
                         f"{'' if isinstance(streams, IndexedStreams) else ', D'}] "
                         "(see make_streams).")
    T = lead[1]
    chunk = T if not chunk_size else min(chunk_size, T)
    if held_out is None and held_out_every is not None:
        raise ValueError(f"held_out_every={held_out_every} without held_out: pass the "
                         "held-out data as held_out=(inputs [N, D], labels [N]).")
    if held_out is not None:
        if held_out_every is not None and held_out_every < 1:
            raise ValueError(f"held_out_every={held_out_every} must be >= 1 (or None: "
                             "test only before and after the stream).")
        every = min(held_out_every or T, T)
        test_x, test_y = _held_out_arrays(learner, held_out, width)
        test = _tester(learner.predict)
    else:
        every = T
    state = init_states(learner, seeds, stream_batch)
    run = _runner(learner.unroll)
    outs, t0 = [], time.perf_counter()
    test_steps, test_acc = [], []
    if held_out is not None:
        test_steps.append(0)
        test_acc.append(np.asarray(test(params, state, test_x, test_y)))
    start = 0
    for stop in _piece_ends(T, chunk, every):
        state, out = run(params, state, get(start, stop))
        outs.append(jax.device_get(out))
        start = stop
        line = ""
        if held_out is not None and (stop % every == 0 or stop == T):
            test_steps.append(stop)
            test_acc.append(np.asarray(test(params, state, test_x, test_y)))
            line = f", held-out accuracy {np.mean(test_acc[-1]):.3f}"
        if log is not None and ((chunk < T and (stop % chunk == 0 or stop == T)) or line):
            elapsed = time.perf_counter() - t0
            so_far = np.mean(np.concatenate([o.correct for o in outs], axis=1))
            log(f"{learner.name}: {stop}/{T} steps x {len(seeds)} seeds, {elapsed:.1f} s, "
                f"online accuracy so far {so_far:.3f}{line}")
    out = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=1), *outs)
    if held_out is None:
        return out
    return HeldOutRun(out=out, test_steps=np.asarray(test_steps, np.int64),
                      test_acc=np.stack(test_acc, axis=1).astype(np.float64))


# --------------------------------------------------------------- metrics
def step_accuracy(correct: np.ndarray) -> np.ndarray:
    """[S, T] fraction correct per step (averaging K examples if present)."""
    correct = np.asarray(correct, np.float64)
    return correct.mean(axis=-1) if correct.ndim == 3 else correct


def cumulative_accuracy(correct: np.ndarray) -> np.ndarray:
    """[S, T]: entry n-1 is the accuracy over the first n steps."""
    acc = step_accuracy(correct)
    return np.cumsum(acc, axis=1) / np.arange(1, acc.shape[1] + 1)


def window_accuracy(correct: np.ndarray, window: int = DEFAULT_WINDOW) -> np.ndarray:
    """[S, T]: accuracy over the last min(t + 1, window) steps."""
    acc = step_accuracy(correct)
    c = np.concatenate([np.zeros((acc.shape[0], 1)), np.cumsum(acc, axis=1)], axis=1)
    t = np.arange(1, acc.shape[1] + 1)
    lo = np.maximum(t - window, 0)
    return (c[:, t] - c[:, lo]) / (t - lo)


def online_metrics(out: StepOutput, checkpoints: Sequence[int] = DEFAULT_CHECKPOINTS,
                   window: int = DEFAULT_WINDOW) -> Dict[str, np.ndarray]:
    """Per-seed metrics [S]: cum_acc@n for n in checkpoints within [1, T] and at
    n = T, final_window_acc (last `window` steps) and mean_loss."""
    cum = cumulative_accuracy(out.correct)
    T = cum.shape[1]
    ns = sorted({n for n in checkpoints if 1 <= n <= T} | {T})
    metrics = {f"cum_acc@{n}": cum[:, n - 1] for n in ns}
    metrics["final_window_acc"] = step_accuracy(out.correct)[:, -window:].mean(axis=1)
    loss = np.asarray(out.loss, np.float64)
    metrics["mean_loss"] = loss.reshape(loss.shape[0], -1).mean(axis=1)
    return metrics


def held_out_metrics(test_steps: np.ndarray, test_acc: np.ndarray) -> Dict[str, np.ndarray]:
    """Per-seed metrics [S] of a held-out curve (steps [E], accuracy [S, E]):
    test_acc@n after every tested step n, and test_acc_final (after the last)."""
    test_acc = np.asarray(test_acc, np.float64)
    metrics = {f"test_acc@{int(n)}": test_acc[:, e] for e, n in enumerate(test_steps)}
    metrics["test_acc_final"] = test_acc[:, -1]
    return metrics


def summarize(per_seed: Dict[str, np.ndarray]) -> Dict[str, Dict[str, Any]]:
    """{metric: {"mean", "std" (over seeds, ddof=0), "per_seed"}}."""
    return {k: {"mean": float(np.mean(v)), "std": float(np.std(v)),
                "per_seed": [float(x) for x in v]} for k, v in per_seed.items()}


@dataclasses.dataclass
class MethodResult:
    """Everything measured for one method on one dataset.

    summary: from `summarize` (with held-out data also test_acc@n and
    test_acc_final); cum_acc, win_acc: [S, T] online curves; test_steps [E]
    and test_acc [S, E]: the held-out curve (None without held-out data).
    """
    summary: Dict[str, Dict[str, Any]]
    cum_acc: np.ndarray
    win_acc: np.ndarray
    test_steps: Optional[np.ndarray] = None
    test_acc: Optional[np.ndarray] = None


def evaluate_method(learner: Learner, params: Any, streams: Streams, seeds: Sequence[int],
                    *, stream_batch: int = 0, checkpoints: Sequence[int] = DEFAULT_CHECKPOINTS,
                    window: int = DEFAULT_WINDOW, chunk_size: Optional[int] = None,
                    log: Optional[Callable[[str], None]] = None,
                    held_out: Optional[Tuple[Any, Any]] = None,
                    held_out_every: Optional[int] = None) -> MethodResult:
    """`evaluate_learner` followed by the metrics and curves (see there for
    held_out and held_out_every)."""
    run = evaluate_learner(learner, params, streams, seeds, stream_batch=stream_batch,
                           chunk_size=chunk_size, log=log, held_out=held_out,
                           held_out_every=held_out_every)
    out = run if held_out is None else run.out
    metrics = online_metrics(out, checkpoints, window)
    if held_out is not None:
        metrics.update(held_out_metrics(run.test_steps, run.test_acc))
    return MethodResult(summary=summarize(metrics),
                        cum_acc=cumulative_accuracy(out.correct),
                        win_acc=window_accuracy(out.correct, window),
                        test_steps=None if held_out is None else run.test_steps,
                        test_acc=None if held_out is None else run.test_acc)


# ----------------------------------------------------------- bookkeeping
def _tree_size(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


def count_variables(learner: Learner, params: Any) -> Dict[str, int]:
    """{"meta_variables": |V_M|, "learned_variables": |V_L|, "state_size"}.

    learned_variables counts what plays the role of weights: VS-ML's cell
    states, an online-GD network's weights and biases, a Meta RNN's c and h;
    state_size counts every number in the learner's state (e.g. also Adam's
    moments).
    """
    state_shape = jax.eval_shape(learner.init_state, jax.random.key(0))
    cfg = learner.config
    counts = {"meta_variables": _tree_size(params), "state_size": _tree_size(state_shape)}
    if isinstance(cfg, VSMLConfig):
        counts["meta_variables"] = count_meta_variables(cfg)
        counts["learned_variables"] = count_learned_variables(cfg)
    elif isinstance(cfg, online_gd.OnlineGDConfig):
        counts["learned_variables"] = online_gd.count_network_params(cfg)
    elif isinstance(cfg, meta_rnn.MetaRNNConfig):
        counts["learned_variables"] = meta_rnn.count_learned_variables(cfg)
    else:
        counts["learned_variables"] = counts["state_size"]
    return counts


def clone_learning_rate(info: Dict[str, Any], cfg: Any) -> float:
    """The SGD learning rate a cloned-backprop learner implements: the rate it
    was cloned with (learner.json "clone": {"lr"}) times the error_scale it runs
    with (the fed error is error_scale x dCE/dlogits). NaN if `info` has none.
    """
    lr = (info.get("clone") or {}).get("lr")
    if lr is None:
        return float("nan")
    return float(lr) * float(getattr(cfg, "error_scale", 1.0))


def config_dict(cfg: Any) -> Any:
    """A JSON-ready view of a learner config (dataclass fields, else repr)."""
    if dataclasses.is_dataclass(cfg):
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(cfg).items()}
    return None if cfg is None else repr(cfg)


# ------------------------------------------------------------- lr selection
def sweep_learning_rate(make_learner: Callable[[float], Learner], lrs: Sequence[float],
                        streams: Any, seeds: Sequence[int], *, stream_batch: int = 0
                        ) -> Tuple[float, List[Dict[str, float]]]:
    """Chooses a learning rate by mean cumulative online accuracy.

    The criterion is the fraction of correct online predictions over the whole
    stream, averaged over the sweep streams (higher is better; ties go to the
    earlier entry of `lrs`). Use streams and seeds that are disjoint from the
    ones the result is reported on.

    Args:
      make_learner: lr -> Learner.
      lrs: candidate learning rates.
      streams: `make_streams(...)` or arrays (inputs
        [S, T, (K,) D], one-hot labels [S, T, (K,) C]).
      seeds: S ints; seed s initialises the network of stream s.
      stream_batch: K if every step carries K examples (a minibatch), else 0.
    Returns:
      (best lr, table) with one row per lr: {"lr", "score", "score_std",
      "mean_loss"}. A run whose mean loss is not finite (it diverged) is only
      chosen if every run diverged.
    """
    if not lrs:
        raise ValueError("sweep_learning_rate: give at least one learning rate.")
    table = []
    for lr in lrs:
        learner = make_learner(float(lr))
        out = evaluate_learner(learner, learner.init_params(jax.random.key(0)),
                                          streams, seeds, stream_batch=stream_batch)
        acc = np.asarray(out.correct, np.float64)
        per_seed = acc.reshape(acc.shape[0], -1).mean(axis=1)
        table.append({"lr": float(lr), "score": float(per_seed.mean()),
                      "score_std": float(per_seed.std()),
                      "mean_loss": float(np.mean(np.asarray(out.loss, np.float64)))})
    finite = [r for r in table if np.isfinite(r["mean_loss"])] or table
    best = max(finite, key=lambda r: r["score"])  # max keeps the first of equals
    return best["lr"], table
