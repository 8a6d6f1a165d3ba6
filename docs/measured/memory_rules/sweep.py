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

    VSML_DATA_DIR=... python docs/measured/memory_rules/sweep.py   # ~3 min on 2 cores

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


if __name__ == "__main__":
    main()
