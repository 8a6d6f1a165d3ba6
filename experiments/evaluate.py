"""Meta-test learners on online streams of test data (paper fig. 6, and fig. 5 mode).

    python -m experiments.evaluate --checkpoint=WORKDIR|pretrained:NAME \
        --datasets=mnist,fashion_mnist --episode_length=2000 --seeds=10 \
        --baselines=adam,sgd,meta_rnn:RNN_WORKDIR --out_dir=DIR

Every method sees the same streams: for each seed, N test examples in random
order (no label permutation), pooled to the learner's input size (the `pool`
it was trained with, or --pool; a VS-ML learner runs at any input size). The
learning rates of the online-backprop baselines are chosen per dataset by a
sweep on streams of the *training* split with separate seeds, and the sweep
table is reported. With --stream_batch=K every step feeds K examples: K copies
of a VS-ML learner with averaged states, a minibatch of K for Adam/SGD.

Writes DIR/summary.json (metrics mean/std/per-seed, settings, sweep tables,
parameter counts, configs), DIR/curves.npz (per-seed curves), DIR/fig6.png
(cumulative online accuracy vs examples seen, one panel per dataset) and
DIR/window_accuracy.png (accuracy over the last --window steps), and prints a
table.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Tuple

import numpy as np
from absl import app, flags

from vsml_jax import evaluation, plotting
from vsml_jax.baselines import online_gd
from vsml_jax.data import make_dataset
from vsml_jax.pretrained import LearnerFileError, load_learner

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Learner to meta-test: a meta_train workdir "
                    "(params.msgpack + learner.json) or pretrained:NAME. Optional if "
                    "only --baselines are evaluated.")
flags.DEFINE_list("datasets", ["mnist", "fashion_mnist"], "Datasets to meta-test on.")
flags.DEFINE_list("baselines", ["adam"], "Also evaluate: adam, sgd (online backprop, lr "
                  "swept), tanh_sgd (y = tanh(x) W + b with SGD), and meta-trained "
                  "checkpoints as KIND:PATH with KIND in meta_rnn, hebbian, vsml.")
flags.DEFINE_integer("episode_length", 1000, "N: steps per stream.", lower_bound=1)
flags.DEFINE_integer("seeds", 10, "Streams (seeds) per dataset and method.", lower_bound=1)
flags.DEFINE_integer("seed_offset", 0, "Streams use seeds seed_offset ... + seeds - 1.",
                     lower_bound=0)
flags.DEFINE_string("split", "test", "Split the streams are drawn from.")
flags.DEFINE_integer("pool", -1, "Average-pool images by this factor (1: 784 inputs, "
                     "2: 196, 4: 49); -1 uses the checkpoint's.")
flags.DEFINE_integer("stream_batch", 0, "K > 0: feed K examples per step (batch-averaged "
                     "VS-ML states / minibatch for Adam, SGD).", lower_bound=0)
flags.DEFINE_list("lrs", ["1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1", "3e-1",
                          "1"], "Learning rates swept for adam / sgd / tanh_sgd.")
flags.DEFINE_integer("sweep_seeds", 3, "Streams per learning rate in the sweep.",
                     lower_bound=1)
flags.DEFINE_integer("sweep_seed_offset", 1_000_000, "Sweep streams use seeds from here "
                     "on (must not overlap the reported seeds).", lower_bound=0)
flags.DEFINE_string("sweep_split", "train", "Split the sweep streams are drawn from.")
flags.DEFINE_integer("sweep_length", 0, "Steps per sweep stream (0: episode_length).",
                     lower_bound=0)
flags.DEFINE_list("gd_hidden", [], "Hidden layer sizes of the adam/sgd network "
                  "(empty: the single layer y = W x + b).")
flags.DEFINE_list("checkpoints", ["100", "500", "1000", "2000"],
                  "Report cumulative accuracy after these many steps (within [1, N]).")
flags.DEFINE_integer("window", 100, "Steps in the final-window accuracy.", lower_bound=1)
flags.DEFINE_integer("chunk_size", 1000, "Run streams in pieces of this many steps and "
                     "print progress after each.", lower_bound=1)
flags.DEFINE_string("data_dir", None, "Folder with mnist/ and fashion_mnist/ IDX files "
                    "(default: $VSML_DATA_DIR, ...).")
flags.DEFINE_string("out_dir", None, "Where summary.json and the figures go.")
flags.mark_flag_as_required("out_dir")

GD_KINDS = ("adam", "sgd", "tanh_sgd")
CHECKPOINT_KINDS = ("meta_rnn", "hebbian", "vsml")
PANEL_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def log(msg: str) -> None:
    print(msg, flush=True)


def gd_factory(kind: str, input_size: int, num_classes: int):
    """lr -> Learner for an online-backprop baseline."""
    hidden = tuple(int(h) for h in FLAGS.gd_hidden)
    if kind == "tanh_sgd":
        return lambda lr: online_gd.tanh_linear_learner(input_size, num_classes,
                                                        learning_rate=lr)
    return lambda lr: online_gd.online_gd_learner(input_size, num_classes, optimizer=kind,
                                                  learning_rate=lr, hidden_sizes=hidden,
                                                  name=kind)


def parse_baselines(specs: List[str]) -> List[Tuple[str, str, str]]:
    """[(method label, kind, path or "")] from --baselines."""
    out, labels = [], set()
    for spec in specs:
        kind, _, path = spec.partition(":")
        if kind in GD_KINDS and not path:
            label = kind
        elif kind in CHECKPOINT_KINDS and path:
            label = kind
        else:
            raise app.UsageError(
                f"--baselines entry {spec!r} is not understood; use {', '.join(GD_KINDS)} "
                f"or KIND:PATH with KIND in {', '.join(CHECKPOINT_KINDS)} (e.g. "
                "meta_rnn:/path/to/meta_train/workdir).")
        n = 2
        while label in labels:
            label, n = f"{kind}_{n}", n + 1
        labels.add(label)
        out.append((label, kind, path))
    return out


def resolve_pool(main) -> int:
    if FLAGS.pool > 0:
        return FLAGS.pool
    if main is None:
        raise app.UsageError("--pool is needed when no --checkpoint is given (1, 2 or 4).")
    if main.pool is None:
        raise app.UsageError(f"cannot tell which pooling {main.source} was trained with "
                             "(no flags.pool in learner.json); pass --pool.")
    return main.pool


def load_checkpoint(spec: str, input_size: int, kind: str = ""):
    try:
        loaded = load_learner(spec, input_size=input_size)
    except LearnerFileError as e:
        raise app.UsageError(str(e)) from e
    if kind and loaded.learner.name != kind:
        raise app.UsageError(f"{spec} holds a {loaded.learner.name!r} learner, not "
                             f"{kind!r}; use --baselines={loaded.learner.name}:{spec}.")
    return loaded


def format_table(dataset: str, results: Dict[str, Dict[str, Any]]) -> str:
    keys = list(next(iter(results.values()))["metrics"])
    lines = [f"== {dataset}: mean +- std over seeds",
             f"{'method':<12}" + "".join(f"{k:>20}" for k in keys)]
    for method, res in results.items():
        cells = "".join(f"{res['metrics'][k]['mean']:>12.4f} +-{res['metrics'][k]['std']:6.4f}"
                        for k in keys)
        lines.append(f"{method:<12}{cells}")
    return "\n".join(lines)


def main(argv):
    del argv
    t_start = time.perf_counter()
    N, K = FLAGS.episode_length, FLAGS.stream_batch
    seeds = list(range(FLAGS.seed_offset, FLAGS.seed_offset + FLAGS.seeds))
    sweep_seeds = list(range(FLAGS.sweep_seed_offset,
                             FLAGS.sweep_seed_offset + FLAGS.sweep_seeds))
    if set(seeds) & set(sweep_seeds):
        raise app.UsageError("the sweep seeds overlap the reported seeds; move "
                             "--sweep_seed_offset past --seed_offset + --seeds.")
    checkpoints = [int(c) for c in FLAGS.checkpoints]
    lrs = [float(x) for x in FLAGS.lrs]
    baselines = parse_baselines(FLAGS.baselines)
    if not FLAGS.checkpoint and not baselines:
        raise app.UsageError("nothing to evaluate: give --checkpoint and/or --baselines.")

    probe = load_checkpoint(FLAGS.checkpoint, None) if FLAGS.checkpoint else None
    pool = resolve_pool(probe)
    input_size = (28 // pool) ** 2

    # Every learner with meta variables, loaded at the streams' input size.
    learners: Dict[str, Any] = {}
    if probe is not None:
        learners[probe.learner.name] = load_checkpoint(FLAGS.checkpoint, input_size)
    for label, kind, path in baselines:
        if path:
            learners[label] = load_checkpoint(path, input_size, kind)
    num_classes = 10
    for name, loaded in learners.items():
        cfg = loaded.learner.config
        c = getattr(cfg, "num_classes", None)
        if c != num_classes:
            raise app.UsageError(f"{name} ({loaded.source}) predicts {c} classes; the "
                                 f"datasets have {num_classes}.")

    os.makedirs(FLAGS.out_dir, exist_ok=True)
    results: Dict[str, Dict[str, Any]] = {}
    curves: Dict[str, np.ndarray] = {}
    cum_panels, win_panels = {}, {}
    eval_kwargs = dict(stream_batch=K, checkpoints=checkpoints, window=FLAGS.window,
                       chunk_size=FLAGS.chunk_size, log=log)
    for dataset in FLAGS.datasets:
        log(f"--- {dataset} ({FLAGS.split} split, pool={pool} -> {input_size} inputs, "
            f"N={N}, {len(seeds)} seeds{f', {K} examples per step' if K else ''})")
        data = make_dataset(dataset, FLAGS.split, data_dir=FLAGS.data_dir, pool=pool)
        streams = evaluation.make_streams(data, seeds, N, stream_batch=K)
        per_method: Dict[str, Dict[str, Any]] = {}

        def record(method, learner, params, extra):
            res = evaluation.evaluate_method(learner, params, streams, seeds, **eval_kwargs)
            per_method[method] = dict(
                metrics=res.summary, counts=evaluation.count_variables(learner, params),
                config=evaluation.config_dict(learner.config), **extra)
            curves[f"{dataset}/{method}/cum_acc"] = res.cum_acc.astype(np.float32)
            curves[f"{dataset}/{method}/win_acc"] = res.win_acc.astype(np.float32)
            log(f"{method}: cumulative accuracy after {N} steps "
                f"{res.summary[f'cum_acc@{N}']['mean']:.4f} +- "
                f"{res.summary[f'cum_acc@{N}']['std']:.4f}")

        for name, loaded in learners.items():
            record(name, loaded.learner, loaded.params,
                   {"source": loaded.source, "trained_flags": loaded.info.get("flags", {})})

        gd = [(label, kind) for label, kind, path in baselines if not path]
        if gd:
            sweep_data = make_dataset(dataset, FLAGS.sweep_split, data_dir=FLAGS.data_dir,
                                      pool=pool)
            sweep_streams = evaluation.make_streams(
                sweep_data, sweep_seeds, FLAGS.sweep_length or N, stream_batch=K)
        for label, kind in gd:
            make = gd_factory(kind, input_size, num_classes)
            best, table = online_gd.sweep_learning_rate(make, lrs, sweep_streams, sweep_seeds,
                                                        stream_batch=K)
            log(f"{label}: lr sweep on {FLAGS.sweep_split} streams "
                + ", ".join(f"{r['lr']:g}: {r['score']:.3f}" for r in table)
                + f" -> lr={best:g}")
            if len(lrs) > 1 and best in (min(lrs), max(lrs)):
                log(f"note: {label}'s best learning rate {best:g} is at the edge of --lrs; "
                    "the optimum may lie outside the grid.")
            learner = make(best)
            record(label, learner, None, {"lr": best, "lr_sweep": table,
                                          "source": "online backprop"})
        results[dataset] = per_method
        title = PANEL_TITLES.get(dataset, dataset)
        cum_panels[title] = {m: plotting.mean_std(curves[f"{dataset}/{m}/cum_acc"])
                             for m in per_method}
        win_panels[title] = {m: plotting.mean_std(curves[f"{dataset}/{m}/win_acc"])
                             for m in per_method}

    xlabel = "examples seen" if not K else f"examples seen ({K} per step)"
    fig = plotting.plot_learning_curves(cum_panels, os.path.join(FLAGS.out_dir, "fig6.png"),
                                        xlabel=xlabel, x_scale=max(K, 1),
                                        ylabel="cumulative online accuracy")
    plotting.plot_learning_curves(win_panels, os.path.join(FLAGS.out_dir,
                                                           "window_accuracy.png"),
                                  xlabel=xlabel, x_scale=max(K, 1),
                                  ylabel=f"accuracy over last {FLAGS.window} steps")
    np.savez_compressed(os.path.join(FLAGS.out_dir, "curves.npz"), **curves)
    summary = {
        "settings": {
            "checkpoint": FLAGS.checkpoint, "baselines": FLAGS.baselines,
            "datasets": FLAGS.datasets, "split": FLAGS.split, "episode_length": N,
            "seeds": seeds, "pool": pool, "input_size": input_size, "stream_batch": K,
            "checkpoints": checkpoints, "window": FLAGS.window, "std": "over seeds, ddof=0",
            "lr_sweep": {"lrs": lrs, "seeds": sweep_seeds, "split": FLAGS.sweep_split,
                         "length": FLAGS.sweep_length or N,
                         "criterion": "mean cumulative online accuracy over the stream"},
            "gd_hidden": [int(h) for h in FLAGS.gd_hidden],
        },
        "results": results,
        "files": {"figure": os.path.basename(fig), "window_figure": "window_accuracy.png",
                  "curves": "curves.npz"},
    }
    with open(os.path.join(FLAGS.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for dataset, per_method in results.items():
        print(format_table(dataset, per_method))
    counts = next(iter(results.values()))
    print("parameters: " + "; ".join(
        f"{m}: {r['counts']['meta_variables']:,} meta / {r['counts']['learned_variables']:,} "
        "learned" for m, r in counts.items()))
    log(f"wrote {FLAGS.out_dir}/summary.json, fig6.png, window_accuracy.png, curves.npz "
        f"in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    app.run(main)
