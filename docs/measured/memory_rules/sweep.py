"""Is the `pretrained:general` target reachable at all? Memory-based rules
(the package's `parzen` baseline) on the streams of `experiments.evaluate`.

The target (docs/general.md) asks for 2 points above the best of nearest
class mean, online Adam and online SGD at N = 100, 500, 1,000, 2,000 on MNIST
and Fashion-MNIST test streams, and above 1-nearest neighbour at N = 100. This
script measures how far rules that keep every example get there:

1. choose, on MNIST *train* streams only (evaluate's sweep seeds 1,000,000 +
   0..9), a per-pixel squashing g (identity, tanh, sqrt(x - min x)) and the
   Parzen bandwidth h, by the criterion evaluate's learning-rate sweep uses
   (mean cumulative online accuracy over the whole stream);
2. report the choice on MNIST and Fashion-MNIST *test* streams (evaluate's
   seeds 0..9), next to every candidate, for comparison with the
   `experiments.evaluate` table of docs/general.md.

    VSML_DATA_DIR=... python docs/measured/memory_rules/sweep.py   # ~4 min on 2 cores

3. measure, on the same MNIST and Fashion-MNIST *train* streams, variants
   that a VS-ML learner with a memory of slots would meet (docs/general.md,
   "What the goal needs"): only the first K examples kept, every 4th kept,
   the kernel summed instead of averaged per class, an L1 (Laplace) kernel.
   These are numpy, not package learners: none of them is offered as one.

Writes its tables to stdout (docs/measured/memory_rules/streams.md holds one run).
"""
import os

import jax.numpy as jnp
import numpy as np

from vsml_jax import data as vdata
from vsml_jax import evaluation
from vsml_jax.baselines import nonparametric

CHECKPOINTS = (100, 500, 1000, 2000)
BANDWIDTHS = (0.05, 0.075, 0.1, 0.15, 0.2)
# Per-pixel functions a VS-ML cell could apply to its input before storing it.
# The inputs are normalised 7x7 images; sqrt is shifted by the smallest value
# normalize_images gives (a blank pixel) so that it is defined everywhere.
SQUASH = {
    "x": lambda x, lo: x,
    "tanh(x)": lambda x, lo: jnp.tanh(x),
    "sqrt(x - min)": lambda x, lo: jnp.sqrt(x - lo),
}


def streams(name, split, seeds, length=2000):
    data = vdata.make_dataset(name, split, data_dir=os.environ.get("VSML_DATA_DIR"), pool=4)
    return data, evaluation.make_streams(data, seeds, length).materialize()


def cumulative(inputs, labels, seeds, bandwidth):
    learner = nonparametric.parzen_learner(inputs.shape[-1], labels.shape[-1],
                                           memory_size=inputs.shape[1], bandwidth=bandwidth)
    out = evaluation.evaluate_learner(learner, None, (inputs, labels), seeds)
    acc = np.asarray(out.correct, np.float64)
    cum = np.cumsum(acc, axis=1) / np.arange(1, acc.shape[1] + 1)
    return acc.mean(), [cum[:, n - 1].mean() for n in CHECKPOINTS]


def variant(inputs, labels, h, *, metric="l2", per_class_mean=True, kept=None):
    """Cumulative online accuracy at CHECKPOINTS of a Parzen-window variant.

    inputs [S, T, D] (already squashed), one-hot labels [S, T, C]; kept: None
    or a [T] 0/1 mask of the stream positions the memory keeps.
    """
    inputs, labels = np.asarray(inputs, np.float64), np.asarray(labels)
    S, T, D = inputs.shape
    earlier = np.tril(np.ones((T, T)), -1) * (1.0 if kept is None else kept[None])
    hits = []
    for x, y in zip(inputs, labels):
        if metric == "l2":
            sq = (x * x).sum(1)
            log_k = -np.maximum(sq[:, None] + sq[None] - 2 * x @ x.T, 0) / (2 * h * h * D)
        else:
            log_k = -np.abs(x[:, None] - x[None]).mean(-1) / h
        top = log_k.max(1, keepdims=True)
        count = earlier @ y
        score = np.log((np.exp(log_k - top) * earlier) @ y + 1e-300) + top
        if per_class_mean:
            score = score - np.log(np.maximum(count, 1))
        score = np.where(count > 0, score, -np.inf)
        score[0] = 0.0
        hits.append(score.argmax(1) == y.argmax(1))
    cum = np.cumsum(hits, axis=1) / np.arange(1, T + 1)
    return [cum[:, n - 1].mean() for n in CHECKPOINTS]


def main():
    sweep_seeds, test_seeds = list(range(1_000_000, 1_000_010)), list(range(10))
    train, (xs, ys) = streams("mnist", "train", sweep_seeds)
    lo = float(train.images.min())
    print("## MNIST train streams (choice)\n")
    print("| g | h | mean over the stream | N=100 | 500 | 1,000 | 2,000 |\n|---|---|---|---|---|---|---|")
    scores = {}
    for g, fn in SQUASH.items():
        for h in BANDWIDTHS:
            score, cum = cumulative(fn(xs, lo), ys, sweep_seeds, h)
            scores[(g, h)] = score
            print(f"| {g} | {h} | {score:.4f} | " + " | ".join(f"{c:.3f}" for c in cum) + " |",
                  flush=True)
    best = max(scores, key=scores.get)
    print(f"\nchosen: g = {best[0]}, h = {best[1]}\n")
    for name in ("mnist", "fashion_mnist"):
        _, (xt, yt) = streams(name, "test", test_seeds)
        print(f"## {name} test streams (report)\n")
        print("| g | h | N=100 | 500 | 1,000 | 2,000 |\n|---|---|---|---|---|---|")
        for g, fn in SQUASH.items():
            for h in (0.1, 0.15):
                _, cum = cumulative(fn(xt, lo), yt, test_seeds, h)
                mark = " (chosen)" if (g, h) == best else ""
                print(f"| {g}{mark} | {h} | " + " | ".join(f"{c:.3f}" for c in cum) + " |",
                      flush=True)
        if best[1] not in (0.1, 0.15):
            _, cum = cumulative(SQUASH[best[0]](xt, lo), yt, test_seeds, best[1])
            print(f"| {best[0]} (chosen) | {best[1]} | " + " | ".join(f"{c:.3f}" for c in cum)
                  + " |")
        print()
    g, h = SQUASH["sqrt(x - min)"], 0.075
    t = np.arange(2000)
    variants = [
        ("all examples (the chosen rule)", {}),
        ("kernel summed, not averaged, per class", dict(per_class_mean=False)),
        ("only the first 500 examples kept", dict(kept=(t < 500).astype(float))),
        ("only every 4th example kept", dict(kept=(t % 4 == 0).astype(float))),
        ("L1 (Laplace) kernel, width 0.02", dict(metric="l1")),
        ("L1 (Laplace) kernel, width 0.04", dict(metric="l1")),
    ]
    for name in ("mnist", "fashion_mnist"):
        _, (xv, yv) = streams(name, "train", sweep_seeds)
        print(f"## {name} train streams: memory variants, g = sqrt(x - min), h = {h}\n")
        print("| variant | N=100 | 500 | 1,000 | 2,000 |\n|---|---|---|---|---|")
        for label, kw in variants:
            width = float(label.rsplit(" ", 1)[-1]) if kw.get("metric") == "l1" else h
            cum = variant(g(xv, lo), yv, width, **kw)
            print(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cum) + " |", flush=True)
        print()


if __name__ == "__main__":
    main()
