"""Hand-designed online rules a single VS-ML layer could run, on MNIST and
Fashion-MNIST *train* streams (the test splits are not used for choosing).

Each rule predicts y_t from what it has seen, then learns (x_t, y_t), like
every learner of `experiments.evaluate`. All but the Parzen rule score class b
by a sum over inputs a of a term that only needs x_a and what cell (a, b) can
store, i.e. they are in the class a one-layer VS-ML learner expresses.

    VSML_DATA_DIR=... python docs/measured/per_cell_rules/sweep.py   # ~2 min on 2 cores

Prints cumulative online accuracy at N = 100, 500, 1,000, 2,000 (mean over 5
streams of 2,000 train examples, 7x7 inputs, labels permuted per stream).
Unseen classes score below every seen class (as `nearest_mean` does).
"""
import os

import jax.numpy as jnp
import numpy as np

from vsml_jax.data.images import normalize_images
from vsml_jax.data.sources import load_dataset

CHECKPOINTS = (100, 500, 1000, 2000)


def streams(name, seeds=5, length=2000, pool=4):
    images, labels = load_dataset(name, "train", os.environ.get("VSML_DATA_DIR"))[:2]
    x = np.asarray(normalize_images(jnp.asarray(images), pool=pool))
    labels = np.asarray(labels)
    out = []
    for s in range(seeds):
        r = np.random.RandomState(100 + s)
        idx = r.choice(len(x), length, replace=False)
        out.append((x[idx], r.permutation(10)[labels[idx]]))
    return out


def online(score_fn, xs, ys, eta=0.0, beta=30.0, stats=False):
    """Runs one stream: score_fn(x, sums, sq_sums, counts) -> [C] per-class scores,
    plus an optional delta-rule correction dW (lr eta on softmax(beta s) - y)."""
    C, D = 10, xs.shape[1]
    S, S2, n, dW = np.zeros((C, D)), np.zeros((C, D)), np.zeros(C), np.zeros((C, D))
    hits = []
    for x, y in zip(xs, ys):
        s = score_fn(x, S, S2, n) + (dW * x).mean(1)
        seen = n > 0
        s = np.where(seen, s, s[seen].min() - 1) if seen.any() else np.zeros(C)
        hits.append(np.argmax(s) == y)
        if eta:
            p = np.exp(beta * (s - s.max()))
            p /= p.sum()
            p[y] -= 1.0
            dW -= eta * p[:, None] * x[None]
        S[y] += x
        S2[y] += x * x
        n[y] += 1
    return np.array(hits, float)


def means(S, n):
    return S / np.maximum(n, 1)[:, None]


def nearest_mean(x, S, S2, n):
    m = means(S, n)
    return (x * m - 0.5 * m * m).mean(1)


def gaussian_nb(lam, v0):
    def score(x, S, S2, n):
        m = means(S, n)
        v = S2 / np.maximum(n, 1)[:, None] - m * m
        v = (n[:, None] * v + lam * v0) / (n[:, None] + lam)  # shrunk to v0
        return -((x - m) ** 2 / (2 * v) + 0.5 * np.log(v)).mean(1)
    return score


def total_variance_weighted(x, S, S2, n):
    tot = max(n.sum(), 1.0)
    mu = S.sum(0) / tot
    v = S2.sum(0) / tot - mu * mu + 0.1
    m = means(S, n)
    return ((x * m - 0.5 * m * m) / v).mean(1)


RULES = [
    ("nearest class mean", nearest_mean, {}, None),
    ("+ delta rule (eta 0.03, beta 30)", nearest_mean, dict(eta=0.03, beta=30.0), None),
    ("+ delta rule (eta 0.1, beta 30)", nearest_mean, dict(eta=0.1, beta=30.0), None),
    ("inputs weighted by 1 / their variance", total_variance_weighted, {}, None),
    ("Gaussian naive Bayes (shrinkage 20, prior var 0.3)", gaussian_nb(20.0, 0.3), {}, None),
    ("nearest class mean of tanh(x)", nearest_mean, {}, np.tanh),
    ("nearest class mean of tanh(x) + delta (0.03, 60)", nearest_mean,
     dict(eta=0.03, beta=60.0), np.tanh),
]


def parzen_rff(xs, ys, features=2048, sigma=2.0):
    """Kernel class mean (Parzen window, RBF of width sigma) through random
    Fourier features: a two-layer rule, not a per-cell one."""
    r = np.random.RandomState(0)
    W, b = r.randn(xs.shape[1], features) / sigma, r.uniform(0, 2 * np.pi, features)
    phi = np.cos(xs @ W + b) * np.sqrt(2.0 / features)
    return online(lambda x, S, S2, n: (x * means(S, n)).sum(1), phi, ys)


def main():
    for name in ("mnist", "fashion_mnist"):
        st = streams(name)
        rows = [(label, [online(fn, f(xs) if f else xs, ys, **kw) for xs, ys in st])
                for label, fn, kw, f in RULES]
        rows.append(("Parzen window, 2,048 random Fourier features (sigma 2)",
                     [parzen_rff(xs, ys) for xs, ys in st]))
        for label, hits in rows:
            cum = np.cumsum(hits, 1) / np.arange(1, hits[0].size + 1)
            print(f"| {name} | {label} | "
                  + " | ".join(f"{cum[:, N - 1].mean():.3f}" for N in CHECKPOINTS) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
