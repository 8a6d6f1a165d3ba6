r"""Figure 4: the cloned forward computation y = tanh(x) w (+ b).

    python -m experiments.fig4 --checkpoint=pretrained:backprop_clone --out_dir=/tmp/fig4

Left: the output y of one cloned cell (a single predict pass, as in eq. 13)
against x, for several w (b = 0), next to the target tanh(x) w (dashed).
Right: a heat map of |y - tanh(x) w| over (x, w). Works for clones of either
stage (`experiments.clone --stage=forward|backprop`).

A cell is written as the state holding (w, b) (`cloning.encode_state`) and
then warmed up by `warmup` steps on random x with e = 0 (the weights do not
change), as every cell is after its first step at meta-test: the very first
pass after writing a state is the least accurate one (its error is reported
separately as first_pass_*).

Writes out_dir/fig4.png (its title names the checkpoint, the grid resolution,
the warm-up and the seed) and out_dir/fig4.json: the mean absolute error over
the grid and over random data (x ~ N(0, x_std^2), w, b uniform in the trained
ranges), each also relative to the spread (std) of the target.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common

from vsml_jax import cloning, pretrained
from vsml_jax.runs.common import claim_out_dir

flags.DEFINE_string("checkpoint", "pretrained:backprop_clone",
                    "A clone: a workdir of experiments.clone or pretrained:NAME.")
flags.DEFINE_float("x_max", 0.0, "x range [-x_max, x_max] (0: 3 x_std of the training "
                   "data).")
flags.DEFINE_float("w_max", 0.0, "w range [-w_max, w_max] (0: the trained w_max).")
flags.DEFINE_integer("warmup", 3, "Steps on random x with e = 0 before measuring.")
flags.DEFINE_integer("random_cells", 4096, "Cells of the random-data measurement.")
flags.DEFINE_integer("seed", 0, "Seed of the warm-up and random data.")
flags.DEFINE_integer("curves", 5, "Number of w values drawn on the left.")
flags.DEFINE_integer("grid", 101, "Grid points per axis of the heat map.")
flags.DEFINE_string("out_dir", None, "Where fig4.png and fig4.json go.")
FLAGS = flags.FLAGS


def warm_states(params, spec, encoding, w, b, key, steps, learn_pass):
    """States holding (w, b) [K] after `steps` steps on random x with e = 0."""
    state = cloning.encode_state(params.cfg, spec, w, b, encoding)
    for k in jax.random.split(key, steps):
        x = spec.x_std * jax.random.normal(k, w.shape)
        state, _ = cloning.cell_forward(params, spec, state, x)
        if learn_pass:  # a backprop clone also runs its learn pass every step
            state, _ = cloning.cell_backward(params, state, x, jnp.zeros_like(x))
    return state


def forward_outputs(params, spec, encoding, x, w, b, key, steps, learn_pass):
    """Cloned y and exact tanh(x) w + b for cells [K] (one predict pass each)."""
    state = warm_states(params, spec, encoding, w, b, key, steps, learn_pass)
    _, y = cloning.cell_forward(params, spec, state, x)
    return y, cloning.forward_target(x, w, b)


def forward_grid(params, spec, encoding, xs, ws, key, steps, learn_pass):
    """[len(ws), len(xs)] cloned outputs y(x, w) and targets, b = 0."""
    X, W = jnp.meshgrid(xs, ws)
    y, t = forward_outputs(params, spec, encoding, X.ravel(), W.ravel(),
                           jnp.zeros(W.size), key, steps, learn_pass)
    return y.reshape(W.shape), t.reshape(W.shape)


def main(argv):
    del argv
    if not FLAGS.out_dir:
        raise app.UsageError("--out_dir is required.")
    # Locked while written; an out_dir with an earlier fig4.json is refused.
    with claim_out_dir(FLAGS.out_dir, "fig4.json"):
        draw()


def draw():
    loaded = pretrained.load_learner(FLAGS.checkpoint)
    if "clone" not in loaded.info:
        raise app.UsageError(f"{FLAGS.checkpoint} is not a clone (its learner.json has no "
                             "'clone' entry); make one with experiments.clone.")
    cloning.check_clone_config(loaded.learner.config)
    spec = cloning.CloneSpec(**loaded.info["clone"])
    encoding = cloning.encoding_from_info(loaded.info)
    params = loaded.params
    x_max = FLAGS.x_max or 3 * spec.x_std
    w_max = FLAGS.w_max or spec.w_max
    xs = jnp.linspace(-x_max, x_max, FLAGS.grid)
    ws = jnp.linspace(-w_max, w_max, FLAGS.grid)
    learn_pass = loaded.info.get("cloning", {}).get("stage") == "backprop"
    key = jax.random.PRNGKey(FLAGS.seed)
    grid_fn = jax.jit(forward_grid, static_argnums=(1, 6, 7))
    y, target = grid_fn(params, spec, encoding, xs, ws, key, FLAGS.warmup, learn_pass)
    err = np.abs(np.asarray(y - target))
    curve_ws = np.linspace(-w_max, w_max, FLAGS.curves)
    y_c, t_c = grid_fn(params, spec, encoding, xs, jnp.asarray(curve_ws), key,
                       FLAGS.warmup, learn_pass)
    # Random data as in training: x ~ N(0, x_std^2), w, b uniform in the trained ranges.
    batch = cloning.sample_batch(jax.random.fold_in(key, 1),
                                 dataclasses.replace(spec, steps=1), FLAGS.random_cells)
    rand = {}
    for name, steps in (("", FLAGS.warmup), ("first_pass_", 0)):
        yr, tr = jax.jit(forward_outputs, static_argnums=(1, 7, 8))(
            params, spec, encoding, batch.x[0], batch.w0, batch.b0, key, steps, learn_pass)
        e = float(jnp.mean(jnp.abs(yr - tr)))
        rand[name + "random_mean_abs_error"] = e
        rand[name + "random_relative_mean_abs_error"] = e / float(jnp.std(tr))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, w in enumerate(curve_ws):
        line, = ax0.plot(xs, y_c[i], label=f"w = {w:.2g}")
        ax0.plot(xs, t_c[i], "--", color=line.get_color(), alpha=0.6)
    ax0.set_xlabel("x")
    ax0.set_ylabel("y (solid: clone, dashed: tanh(x) w)")
    ax0.legend(fontsize=7)
    ax0.grid(alpha=0.3)
    im = ax1.imshow(err, origin="lower", aspect="auto", cmap="viridis",
                    extent=(-x_max, x_max, -w_max, w_max))
    fig.colorbar(im, ax=ax1, label="|y - tanh(x) w|")
    ax1.set_xlabel("x")
    ax1.set_ylabel("w")
    ax0.set_title(f"one cloned cell, b = 0, {FLAGS.curves} values of w", fontsize=9)
    ax1.set_title(f"|error| on a {FLAGS.grid} x {FLAGS.grid} grid of (x, w), b = 0",
                  fontsize=9)
    fig.suptitle(f"Fig. 4, cloned forward computation y = tanh(x) w: {FLAGS.checkpoint}\n"
                 f"{FLAGS.warmup} warm-up steps on random x (seed {FLAGS.seed}); mean "
                 f"|error| {err.mean():.3g} ({err.mean() / np.std(np.asarray(target)):.2%} "
                 "of the target's std)", fontsize=9)
    fig.tight_layout()
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    png = os.path.join(FLAGS.out_dir, "fig4.png")
    fig.savefig(png, dpi=150)
    summary = {"checkpoint": FLAGS.checkpoint, "x_max": float(x_max), "w_max": float(w_max),
               "warmup": FLAGS.warmup, "seed": FLAGS.seed, "grid": FLAGS.grid,
               "grid_mean_abs_error": float(err.mean()), "grid_max_abs_error": float(err.max()),
               "grid_target_std": float(np.std(np.asarray(target))),
               "grid_relative_mean_abs_error": float(err.mean() / np.std(np.asarray(target))),
               **rand, "spec": dataclasses.asdict(spec)}
    path = os.path.join(FLAGS.out_dir, "fig4.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "spec"}, indent=1))
    print(f"wrote {png} and {path}")


if __name__ == "__main__":
    common.run(main, cluster_flags=False)
