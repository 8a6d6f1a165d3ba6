"""Meta-test learners on online streams of test data (paper fig. 6, and fig. 5 mode).

    python -m experiments.evaluate --checkpoint=WORKDIR|pretrained:NAME \
        --datasets=mnist,fashion_mnist --episode_length=2000 --seeds=10 \
        --baselines=adam,sgd,nearest_mean,meta_rnn:RNN_WORKDIR --out_dir=DIR

Every method sees the same streams: for each seed, N examples of --split in
random order (no label permutation), pooled to the learner's input size (the `pool`
it was trained with, or --pool, or --input_size; a VS-ML learner runs at any input
size).

--datasets takes any data set spec (`vsml_jax.data.specs`): mnist,
fashion_mnist, idx:DIR, npz:FILE, tfds:NAME, and mixtures joined by "+"
(--datasets=mnist+fashion_mnist,npz:letters.npz is two entries, the first a
mixture whose streams come from one of its data sets per seed). Colour images
are made grey and every image is resized to the input size
(`vsml_jax.data.normalize`). Each learner is built for each data set's number
of classes: a VS-ML learner meta-trained on 10 classes runs on 5 or 26, and
the baselines follow the data; a learner whose meta variables depend on the
class count (the Meta RNN) is refused with the reason. The
learning rates of the online-backprop baselines are chosen per dataset by a
sweep on streams of the *training* split with separate seeds, and the sweep
table is reported (a single entry in --lrs, or --tanh_sgd_lr, fixes the rate
with no sweep). With --stream_batch=K every step feeds K examples: K copies
of a VS-ML learner with averaged states, a minibatch of K for Adam/SGD (T x K
examples per stream, drawn with replacement beyond the split's size).

With --shuffle_pixels=S every image's pixels are shuffled by one fixed
permutation: a learner that does not use where a pixel is (VS-ML without
coordinates, nearest mean / neighbour) scores the same as without.

Held-out test curves: with --test_every=M every learner also classifies the
first --test_examples images of --test_split after step 0 and every M steps
(learning nothing from them); the streams then come from the training split.
The cloned-backprop comparison of fig. 5 with the paper's batch averaging:

    python -m experiments.evaluate --checkpoint=pretrained:backprop_clone \
        --baselines=tanh_sgd --tanh_sgd_lr=clone --tanh_sgd_init_scale=0 \
        --stream_batch=64 --episode_length=1000 --test_every=100 --seeds=10 \
        --out_dir=DIR

Writes DIR/summary.json (metrics mean/std/per-seed, settings, sweep tables,
parameter counts, configs, held-out curves, and under "data" the folder / file
each data set was read from), DIR/curves.npz (per-seed curves),
DIR/fig6.png (cumulative online accuracy vs examples seen, one panel per
dataset), DIR/window_accuracy.png (accuracy over the last --window steps) and,
with --test_every, DIR/test_accuracy.png (held-out accuracy vs examples seen),
and prints a table.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from absl import app, flags

from experiments import common

from vsml_jax import evaluation, plotting
from vsml_jax.baselines import nonparametric, online_gd
from vsml_jax.data import Dataset, make_dataset, split_spec, target_side
from vsml_jax.pretrained import LearnerFileError, load_learner

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Learner to meta-test: a meta_train workdir "
                    "(params.msgpack + learner.json) or pretrained:NAME. Optional if "
                    "only --baselines are evaluated.")
flags.DEFINE_string("label", None, "Name of the --checkpoint learner in tables and plots "
                    "(default: its kind, e.g. vsml).")
common.define_data_flags("mnist,fashion_mnist", multi=True)
flags.DEFINE_list("baselines", ["adam"], "Also evaluate: adam, sgd (online backprop, lr "
                  "swept), tanh_sgd (y = tanh(x) W + b with SGD), nearest_mean, "
                  "nearest_neighbour (non-parametric, nothing tuned), and meta-trained "
                  "checkpoints as KIND:PATH with KIND in meta_rnn, hebbian, vsml; prefix "
                  "LABEL= to name an entry (e.g. 'Meta RNN=meta_rnn:runs/mrnn').")
flags.DEFINE_integer("episode_length", 1000, "N: steps per stream.", lower_bound=1)
flags.DEFINE_integer("seeds", 10, "Streams (seeds) per dataset and method.", lower_bound=1)
flags.DEFINE_integer("seed_offset", 0, "Streams use seeds seed_offset ... + seeds - 1.",
                     lower_bound=0)
flags.DEFINE_string("split", "test", "Split the streams are drawn from (left at its "
                    "default with --test_every > 0: train).")
flags.DEFINE_integer("pool", -1, "Average-pool images by this factor (1: 784 inputs, "
                     "2: 196, 4: 49); -1 uses the checkpoint's.")
flags.DEFINE_integer("input_size", 0, "D > 0: resize every image to sqrt(D) x sqrt(D) "
                     "(a square number, e.g. 64 for 8x8) instead of 28 // pool.",
                     lower_bound=0)
flags.DEFINE_integer("shuffle_pixels", -1, "S >= 0: shuffle the input pixels of every "
                     "image (streams, sweep and held-out) by one fixed permutation drawn "
                     "with seed S, to test whether a learner uses where a pixel is "
                     "(-1: off).", lower_bound=-1)
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
flags.DEFINE_string("tanh_sgd_lr", "", "Learning rate of tanh_sgd: empty sweeps --lrs, "
                    "a number fixes it, 'clone' takes the rate the --checkpoint was cloned "
                    "to implement (clone.lr x error_scale in its learner.json).")
flags.DEFINE_float("tanh_sgd_init_scale", 1.0, "tanh_sgd's weights start N(0, s^2 / D); 0 "
                   "starts from W = 0, b = 0 like the cloned learner (fig. 5).",
                   lower_bound=0.0)
flags.DEFINE_integer("test_every", 0, "M > 0: test every learner on held-out images after "
                     "step 0 and every M steps (0: off).", lower_bound=0)
flags.DEFINE_integer("test_examples", 1000, "Held-out images: the first N of --test_split.",
                     lower_bound=1)
flags.DEFINE_string("test_split", "test", "Split the held-out images come from.")
flags.DEFINE_list("gd_hidden", [], "Hidden layer sizes of the adam/sgd network "
                  "(empty: the single layer y = W x + b).")
flags.DEFINE_list("checkpoints", ["100", "500", "1000", "2000"],
                  "Report cumulative accuracy after these many steps (within [1, N]).")
flags.DEFINE_integer("window", 100, "Steps in the final-window accuracy.", lower_bound=1)
flags.DEFINE_integer("chunk_size", 1000, "Run streams in pieces of this many steps and "
                     "print progress after each.", lower_bound=1)
flags.DEFINE_string("out_dir", None, "Where summary.json and the figures go.")
flags.mark_flag_as_required("out_dir")

GD_KINDS = ("adam", "sgd", "tanh_sgd")
NONPARAMETRIC_KINDS = nonparametric.METHODS
CHECKPOINT_KINDS = ("meta_rnn", "hebbian", "vsml")
PANEL_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def log(msg: str) -> None:
    print(msg, flush=True)


def gd_factory(kind: str, input_size: int, num_classes: int):
    """lr -> Learner for an online-backprop baseline."""
    hidden = tuple(int(h) for h in FLAGS.gd_hidden)
    if kind == "tanh_sgd":
        return lambda lr: online_gd.tanh_linear_learner(
            input_size, num_classes, learning_rate=lr, init_scale=FLAGS.tanh_sgd_init_scale)
    return lambda lr: online_gd.online_gd_learner(input_size, num_classes, optimizer=kind,
                                                  learning_rate=lr, hidden_sizes=hidden,
                                                  name=kind)


def parse_baselines(specs: List[str], taken: Tuple[str, ...] = ()) -> List[Tuple[str, str, str]]:
    """[(method label, kind, path or "")] from --baselines.

    An entry is KIND or KIND:PATH, optionally prefixed by "LABEL=" (the name in
    tables and plots). Labels are unique, also against `taken` (the
    --checkpoint learner's label): a second "vsml" becomes "vsml_2".
    """
    out, labels = [], set(taken)
    for spec in specs:
        name, _, rest = spec.rpartition("=")
        kind, _, path = rest.partition(":")
        if not ((kind in GD_KINDS + NONPARAMETRIC_KINDS and not path)
                or (kind in CHECKPOINT_KINDS and path)):
            raise app.UsageError(
                f"--baselines entry {spec!r} is not understood; use "
                f"{', '.join(GD_KINDS + NONPARAMETRIC_KINDS)} "
                f"or KIND:PATH with KIND in {', '.join(CHECKPOINT_KINDS)} (e.g. "
                "meta_rnn:/path/to/meta_train/workdir), optionally as LABEL=KIND[:PATH].")
        if name and name in labels:
            raise app.UsageError(f"--baselines: the label {name!r} is used twice.")
        label, n = name or kind, 2
        while label in labels:
            label, n = f"{kind}_{n}", n + 1
        labels.add(label)
        out.append((label, kind, path))
    return out


# 1-nearest neighbour keeps every example of every seed's stream in memory.
NEAREST_NEIGHBOUR_MAX_BYTES = 8 * 2**30


def check_memory_of_nearest_neighbour(baselines, seeds: int, examples: int,
                                      input_size: int) -> None:
    """UsageError if the nearest_neighbour baseline's memories would not fit."""
    if not any(kind == "nearest_neighbour" for _, kind, _ in baselines):
        return
    size = seeds * examples * input_size * 4
    if size > NEAREST_NEIGHBOUR_MAX_BYTES:
        raise app.UsageError(
            f"the nearest_neighbour baseline would hold {seeds} seeds x {examples:,} "
            f"examples x {input_size} float32 inputs = {size / 2**30:.1f} GiB; use fewer "
            "--seeds, a shorter --episode_length or a larger --pool, or drop it from "
            "--baselines.")


def resolve_pool(main) -> int:
    if FLAGS.pool > 0:
        return FLAGS.pool
    if FLAGS.input_size:
        return -1  # unused: --input_size decides
    if main is None:
        raise app.UsageError("--pool (1, 2 or 4) or --input_size is needed when no "
                             "--checkpoint is given.")
    if main.pool is None:
        raise app.UsageError(f"cannot tell which pooling {main.source} was trained with "
                             "(no flags.pool in learner.json); pass --pool.")
    return main.pool


def resolve_input_size(pool: int) -> int:
    """D: --input_size, else (28 // pool)^2; UsageError if not a valid size."""
    try:
        side = target_side(FLAGS.input_size or None, pool)
    except ValueError as e:
        raise app.UsageError(f"--input_size / --pool: {e}") from e
    return side * side


def check_dataset_specs() -> None:
    """UsageError for a --datasets entry that is no data set spec."""
    if not FLAGS.datasets:
        raise app.UsageError("--datasets is empty; name at least one data set.")
    for spec in FLAGS.datasets:
        try:
            split_spec(spec)
        except ValueError as e:
            raise app.UsageError(f"--datasets: {e}") from e


def load_checkpoint(spec: str, input_size: Optional[int], kind: str = "",
                    num_classes: Optional[int] = None):
    try:
        loaded = load_learner(spec, input_size=input_size, num_classes=num_classes)
    except LearnerFileError as e:
        raise app.UsageError(str(e)) from e
    if kind and loaded.learner.name != kind:
        raise app.UsageError(f"{spec} holds a {loaded.learner.name!r} learner, not "
                             f"{kind!r}; use --baselines={loaded.learner.name}:{spec}.")
    return loaded


def fixed_tanh_sgd_lr(main) -> Optional[float]:
    """tanh_sgd's learning rate from --tanh_sgd_lr (None: sweep --lrs)."""
    spec = FLAGS.tanh_sgd_lr.strip()
    if not spec:
        return None
    if spec == "clone":
        if main is None:
            raise app.UsageError("--tanh_sgd_lr=clone needs a cloned learner as --checkpoint "
                                 "(e.g. pretrained:backprop_clone).")
        lr = evaluation.clone_learning_rate(main.info, main.learner.config)
        if not np.isfinite(lr):
            raise app.UsageError(f"--tanh_sgd_lr=clone: {main.source} is not a cloned "
                                 "learner (its learner.json has no \"clone\": {\"lr\"}); "
                                 "pass the rate as a number.")
        return lr
    try:
        lr = float(spec)
    except ValueError:
        raise app.UsageError(f"--tanh_sgd_lr={spec!r}: give a number, 'clone' or nothing "
                             "(sweep --lrs).") from None
    if not lr >= 0:
        raise app.UsageError(f"--tanh_sgd_lr={spec}: must be >= 0.")
    return lr


def stream_split() -> str:
    """The split the streams come from: with held-out tests never the test split."""
    if not FLAGS.test_every:
        return FLAGS.split
    if not FLAGS["split"].present:
        split = "train" if FLAGS.test_split != "train" else "test"
        log(f"--test_every={FLAGS.test_every}: streams come from the {split} split, "
            f"held-out images from the {FLAGS.test_split} split (set --split to choose).")
        return split
    if FLAGS.split == FLAGS.test_split:
        raise app.UsageError(
            f"--split={FLAGS.split} and --test_split={FLAGS.test_split}: the streams would "
            "contain the held-out images; draw the streams from another split (e.g. "
            "--split=train) or leave --split unset.")
    return FLAGS.split


def load_data(dataset: str, split: str, pool: int, input_size: int) -> Dataset:
    """A split at the learners' input size, with its pixels shuffled if
    --shuffle_pixels asks for it (the same permutation for every split and data
    set of the same size)."""
    data = make_dataset(dataset, split, data_dir=FLAGS.data_dir, pool=max(pool, 1),
                        download=FLAGS.download, input_size=input_size)
    if FLAGS.shuffle_pixels < 0:
        return data
    perm = np.random.default_rng(FLAGS.shuffle_pixels).permutation(data.input_dim)
    return dataclasses.replace(data, images=data.images[:, perm])


def held_out_data(dataset: str, pool: int, input_size: int):
    """((images [N, D], labels [N]), the Dataset they come from): the first
    --test_examples of --test_split."""
    data = load_data(dataset, FLAGS.test_split, pool, input_size)
    try:
        return evaluation.held_out_set(data, FLAGS.test_examples), data
    except ValueError as e:
        raise app.UsageError(f"{dataset} {FLAGS.test_split}: {e}") from e


def format_table(dataset: str, results: Dict[str, Dict[str, Any]]) -> str:
    # test_acc@n for every tested step would make the table too wide; the
    # JSON has them all, the table the final one.
    keys = [k for k in next(iter(results.values()))["metrics"]
            if not k.startswith("test_acc@")]
    w = max([12] + [len(m) + 1 for m in results])
    lines = [f"== {dataset}: mean +- std over seeds",
             f"{'method':<{w}}" + "".join(f"{k:>20}" for k in keys)]
    for method, res in results.items():
        cells = "".join(f"{res['metrics'][k]['mean']:>12.4f} +-{res['metrics'][k]['std']:6.4f}"
                        for k in keys)
        lines.append(f"{method:<{w}}{cells}")
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
    check_dataset_specs()
    probe = load_checkpoint(FLAGS.checkpoint, None) if FLAGS.checkpoint else None
    main_label = (FLAGS.label or probe.learner.name) if probe else None
    baselines = parse_baselines(FLAGS.baselines, (main_label,) if probe else ())
    if not FLAGS.checkpoint and not baselines:
        raise app.UsageError("nothing to evaluate: give --checkpoint and/or --baselines.")

    pool = resolve_pool(probe)
    input_size = resolve_input_size(pool)
    split = stream_split()
    test_every = FLAGS.test_every
    tanh_sgd_lr = fixed_tanh_sgd_lr(probe)
    examples_per_stream = N * max(K, 1)
    check_memory_of_nearest_neighbour(baselines, len(seeds), examples_per_stream, input_size)

    # Every data set's stream split, then every learner with meta variables at
    # the streams' input size and each data set's class count (loaded once per
    # class count: every Learner object compiles its own programs). All before
    # the first run, so a learner that cannot take a data set fails at once.
    stream_data = {dataset: load_data(dataset, split, pool, input_size)
                   for dataset in FLAGS.datasets}
    checkpoints_to_load = ([(main_label, FLAGS.checkpoint, "")] if probe is not None else [])
    checkpoints_to_load += [(label, path, kind) for label, kind, path in baselines if path]
    by_classes: Dict[Tuple[str, int], Any] = {}
    for data in stream_data.values():
        for label, path, kind in checkpoints_to_load:
            key = (label, data.num_classes)
            if key not in by_classes:
                by_classes[key] = load_checkpoint(path, input_size, kind, data.num_classes)

    os.makedirs(FLAGS.out_dir, exist_ok=True)
    results: Dict[str, Dict[str, Any]] = {}
    data_info: Dict[str, Dict[str, Any]] = {}
    curves: Dict[str, np.ndarray] = {}
    cum_panels, win_panels, test_panels = {}, {}, {}
    for dataset in FLAGS.datasets:
        data = stream_data[dataset]
        num_classes = data.num_classes
        log(f"--- {dataset} ({data.source}; {split} split, {num_classes} classes, "
            f"{input_size} inputs, N={N}, {len(seeds)} seeds"
            f"{f', {K} examples per step' if K else ''}"
            + (f", held-out test every {test_every} steps on {FLAGS.test_examples} "
               f"{FLAGS.test_split} images" if test_every else "") + ")")
        data_info[dataset] = {"num_classes": num_classes, "input_size": input_size,
                              "stream": evaluation.describe_dataset(data)}
        streams = evaluation.make_streams(data, seeds, N, stream_batch=K)
        eval_kwargs = dict(stream_batch=K, checkpoints=checkpoints, window=FLAGS.window,
                           chunk_size=FLAGS.chunk_size, log=log)
        if test_every:
            held_out, held_out_set = held_out_data(dataset, pool, input_size)
            if held_out_set.num_classes != num_classes:
                raise app.UsageError(
                    f"{dataset}: the {split} split has {num_classes} classes but the "
                    f"{FLAGS.test_split} split {held_out_set.num_classes}; both splits "
                    "must label the same classes.")
            eval_kwargs.update(held_out=held_out, held_out_every=test_every)
            data_info[dataset]["held_out"] = evaluation.describe_dataset(held_out_set)
        learners = {label: by_classes[(label, num_classes)]
                    for label, _, _ in checkpoints_to_load}
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
            if res.test_acc is not None:
                per_method[method]["held_out"] = {
                    "steps": res.test_steps.tolist(),
                    "examples_seen": (res.test_steps * max(K, 1)).tolist(),
                    "acc_mean": res.test_acc.mean(axis=0).tolist(),
                    "acc_std": res.test_acc.std(axis=0).tolist()}
                curves[f"{dataset}/{method}/test_acc"] = res.test_acc.astype(np.float32)
                curves[f"{dataset}/{method}/test_steps"] = res.test_steps
                final = res.summary["test_acc_final"]
                log(f"{method}: held-out accuracy after {N} steps {final['mean']:.4f} +- "
                    f"{final['std']:.4f}")

        for name, loaded in learners.items():
            record(name, loaded.learner, loaded.params,
                   {"source": loaded.source, "trained_flags": loaded.info.get("flags", {})})

        for label, kind, path in baselines:
            if kind in NONPARAMETRIC_KINDS:
                learner = nonparametric.nonparametric_learner(
                    input_size, num_classes, method=kind, memory_size=examples_per_stream)
                record(label, learner, None, {"source": "non-parametric"})
        gd = [(label, kind) for label, kind, path in baselines if kind in GD_KINDS]
        swept = [k for _, k in gd if not (k == "tanh_sgd" and tanh_sgd_lr is not None)]
        if swept and len(lrs) > 1:
            sweep_data = load_data(dataset, FLAGS.sweep_split, pool, input_size)
            data_info[dataset]["sweep"] = evaluation.describe_dataset(sweep_data)
            sweep_streams = evaluation.make_streams(
                sweep_data, sweep_seeds, FLAGS.sweep_length or N, stream_batch=K)
        for label, kind in gd:
            make = gd_factory(kind, input_size, num_classes)
            if kind == "tanh_sgd" and tanh_sgd_lr is not None:
                best, table, how = tanh_sgd_lr, None, f"--tanh_sgd_lr={FLAGS.tanh_sgd_lr}"
            elif len(lrs) == 1:  # nothing to choose: no sweep runs
                best, table, how = lrs[0], None, "--lrs (one entry)"
            else:
                best, table = evaluation.sweep_learning_rate(make, lrs, sweep_streams,
                                                            sweep_seeds, stream_batch=K)
                how = f"sweep on {FLAGS.sweep_split} streams"
                log(f"{label}: lr {how} "
                    + ", ".join(f"{r['lr']:g}: {r['score']:.3f}" for r in table)
                    + f" -> lr={best:g}")
                if best in (min(lrs), max(lrs)):
                    log(f"note: {label}'s best learning rate {best:g} is at the edge of "
                        "--lrs; the optimum may lie outside the grid.")
            if table is None:
                log(f"{label}: lr={best:g} from {how}")
            learner = make(best)
            record(label, learner, None, {"lr": best, "lr_sweep": table, "lr_source": how,
                                          "source": "online backprop"})
        results[dataset] = per_method
        title = PANEL_TITLES.get(dataset, dataset)
        cum_panels[title] = {m: plotting.mean_std(curves[f"{dataset}/{m}/cum_acc"])
                             for m in per_method}
        win_panels[title] = {m: plotting.mean_std(curves[f"{dataset}/{m}/win_acc"])
                             for m in per_method}
        if test_every:
            test_panels[title] = {m: (curves[f"{dataset}/{m}/test_steps"],
                                      curves[f"{dataset}/{m}/test_acc"]) for m in per_method}

    xlabel = "examples seen" if not K else f"examples seen ({K} per step)"
    side = math.isqrt(input_size)
    title = (f"{len(seeds)} seeds (mean +- std), {side}x{side} inputs, "
             f"{split} split streams")
    fig = plotting.plot_learning_curves(cum_panels, os.path.join(FLAGS.out_dir, "fig6.png"),
                                        xlabel=xlabel, x_scale=max(K, 1),
                                        ylabel="cumulative online accuracy", title=title)
    plotting.plot_learning_curves(win_panels, os.path.join(FLAGS.out_dir,
                                                           "window_accuracy.png"),
                                  xlabel=xlabel, x_scale=max(K, 1),
                                  ylabel=f"accuracy over last {FLAGS.window} steps",
                                  title=title)
    files = {"figure": os.path.basename(fig), "window_figure": "window_accuracy.png",
             "curves": "curves.npz"}
    if test_every:
        plotting.plot_held_out_curves(test_panels, os.path.join(FLAGS.out_dir,
                                                                  "test_accuracy.png"),
                                        xlabel=xlabel, x_scale=max(K, 1), title=title)
        files["test_figure"] = "test_accuracy.png"
    np.savez_compressed(os.path.join(FLAGS.out_dir, "curves.npz"), **curves)
    summary = {
        "settings": {
            "checkpoint": FLAGS.checkpoint, "baselines": FLAGS.baselines,
            "datasets": FLAGS.datasets, "split": split, "episode_length": N,
            "seeds": seeds, "pool": pool if pool > 0 else None, "input_size": input_size,
            "stream_batch": K, "data_dir": FLAGS.data_dir, "download": FLAGS.download,
            "checkpoints": checkpoints, "window": FLAGS.window, "std": "over seeds, ddof=0",
            "shuffle_pixels": FLAGS.shuffle_pixels,
            "lr_sweep": {"lrs": lrs, "seeds": sweep_seeds, "split": FLAGS.sweep_split,
                         "length": FLAGS.sweep_length or N,
                         "criterion": "mean cumulative online accuracy over the stream"},
            "gd_hidden": [int(h) for h in FLAGS.gd_hidden],
            "tanh_sgd": {"lr_flag": FLAGS.tanh_sgd_lr, "fixed_lr": tanh_sgd_lr,
                         "init_scale": FLAGS.tanh_sgd_init_scale},
            # The held-out images are the first `examples` of `split`.
            "held_out": ({"every": test_every, "examples": FLAGS.test_examples,
                          "split": FLAGS.test_split} if test_every else None),
        },
        "results": results,
        # Per data set: what was read (folder / file / tfds set) for each role.
        "data": data_info,
        "files": files,
    }
    with open(os.path.join(FLAGS.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for dataset, per_method in results.items():
        print(format_table(dataset, per_method))
    counts = next(iter(results.values()))
    print("parameters: " + "; ".join(
        f"{m}: {r['counts']['meta_variables']:,} meta / {r['counts']['learned_variables']:,} "
        "learned" for m, r in counts.items()))
    log(f"wrote {FLAGS.out_dir}/summary.json, " + ", ".join(files.values())
        + f" in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    common.run(main, cluster_flags=False)
