r"""Figure 5: the cloned backprop learning on MNIST and Fashion-MNIST.

    python -m experiments.fig5 --out_dir=runs/fig5        # 10 seeds, 3,000 steps, 28x28
    python -m experiments.fig5 --out_dir=runs/fig5_b64 --stream_batch=64 --pool=4
    python -m experiments.fig5 --out_dir=runs/fig5_stacked --hidden_sizes=32 --pool=4

A cloned learner (a VS-ML network whose LSTM cells were trained on random data
to implement backprop, `experiments.clone`) learns online from a stream of
training images, with no gradient computed anywhere. Next to it runs explicit
online SGD on the same network, y = tanh(x) W + b from W = 0, b = 0
(`vsml_jax.baselines.online_gd.tanh_linear_learner`), at the clone's
effective learning rate (clone.lr x error_scale, from its learner.json) unless
--sgd_lr is given. Every `eval_every` steps both are tested on the first
`test_examples` images of the test split (predictions only; the test images
never change the learner). Optionally an improved clone (meta-trained from the
clone, e.g. by CMA-ES: `experiments.meta_train --init_checkpoint=...`) is drawn
as well.

One step feeds one image, or with --stream_batch=K (the paper uses 64) K
images: K copies of the clone whose states are averaged after every step, and
a minibatch of K for SGD. Seed s gives every method the same stream
(`vsml_jax.evaluation.make_streams`) and the held-out curves come from
`vsml_jax.evaluation.evaluate_method`, as in `experiments.evaluate
--test_every`.

--datasets takes any data set spec (`vsml_jax.data.specs`: mnist,
fashion_mnist, idx:DIR, npz:FILE, tfds:NAME, mixtures joined by "+"); images are
made grey and resized to the input size, and the clone and SGD are built for
each data set's number of classes (V_M does not depend on it).

Writes out_dir/fig5.json (flags, learning rates, summary, curves per seed, and
under "data" the folder / file each data set was read from) and
out_dir/fig5.png (mean and std over seeds of the test accuracy vs steps, one
panel per dataset). Progress lines give an ETA for the whole figure; at the
end a short table per data set (final test accuracy, mean +- std over seeds)
and where the files went are printed.
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from absl import app, flags, logging

from experiments import common

from vsml_jax import data as vdata
from vsml_jax import cloning, evaluation, plotting, pretrained
from vsml_jax.baselines import online_gd
from vsml_jax.config import VSMLConfig
from vsml_jax.learners import vsml_learner
from vsml_jax.runs.common import claim_out_dir

flags.DEFINE_string("checkpoint", "pretrained:backprop_clone",
                    "The cloned learner: a workdir of experiments.clone or pretrained:NAME.")
flags.DEFINE_string("improved_checkpoint", None, "Optional: a learner meta-trained from "
                    "the clone (drawn as 'clone + meta-training').")
common.define_data_flags("mnist,fashion_mnist", multi=True)
flags.DEFINE_integer("pool", 1, "Average pooling of the images (1: 28x28 = 784 inputs).",
                     lower_bound=1)
flags.DEFINE_integer("input_size", 0, "D > 0: resize every image to sqrt(D) x sqrt(D) "
                     "(a square number) instead of 28 // pool.", lower_bound=0)
flags.DEFINE_integer("steps", 3000, "Steps per stream (training images, K per step with "
                     "--stream_batch=K).", lower_bound=1)
flags.DEFINE_integer("eval_every", 500, "Test every this many steps.", lower_bound=1)
flags.DEFINE_integer("test_examples", 500, "Test images per evaluation (first n of the "
                     "test split).", lower_bound=1)
flags.DEFINE_integer("seeds", 10, "Streams (seeds) per dataset and method.", lower_bound=1)
flags.DEFINE_integer("stream_batch", 0, "0: one image per step (online); K > 0: K images "
                     "per step, the clone's K copies averaged after every step and SGD on "
                     "minibatches of K (the paper: 64).", lower_bound=0)
flags.DEFINE_float("sgd_lr", 0.0, "Learning rate of the SGD baseline (0: the clone's "
                   "effective rate clone.lr x error_scale).", lower_bound=0.0)
flags.DEFINE_float("error_scale", 0.0, "Override the clone's error_scale (0: keep).",
                   lower_bound=0.0)
flags.DEFINE_list("hidden_sizes", [], "Stack the cloned cells into a deeper network "
                  "with these hidden layers (e.g. 32): the stacked clone and SGD on the same "
                  "network are drawn next to the single-layer ones.")
flags.DEFINE_float("w_init_std", 0.1, "With --hidden_sizes: std of the initial weights of "
                   "every layer, clone and SGD alike (the single layers start at 0).",
                   lower_bound=0.0)
flags.DEFINE_string("out_dir", None, "Where fig5.json and fig5.png go.")
FLAGS = flags.FLAGS

PANEL_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion MNIST"}


def load_clone(spec: str, input_size: int, error_scale: float = 0.0,
               num_classes: Optional[int] = None):
    """(Learner, params, effective SGD learning rate) of a cloned VS-ML learner
    for input_size inputs and num_classes classes (None: as cloned).

    error_scale > 0 replaces the config's error_scale (and so the rate).
    """
    try:
        loaded = pretrained.load_learner(spec, input_size=input_size,
                                         num_classes=num_classes)
    except pretrained.LearnerFileError as e:
        raise app.UsageError(str(e)) from e
    learner, params = loaded.learner, loaded.params
    if not isinstance(learner.config, VSMLConfig):
        raise app.UsageError(f"{spec} holds a {learner.name!r} learner; figure 5 needs a "
                             "VS-ML learner (experiments.clone or meta_train output).")
    if error_scale > 0:
        cfg = learner.config.replace(error_scale=error_scale)
        learner, params = vsml_learner(cfg), params.replace(cfg=cfg)
    return learner, params, evaluation.clone_learning_rate(loaded.info, learner.config)


def load_methods(input_size: int, num_classes: int = 10):
    """({method: (Learner, params)}, {"sgd_lr", "clone_rate", "input_size",
    "num_classes"}) for data sets with num_classes classes.

    Loaded once per class count, not per data set: every Learner object has
    its own compiled programs.
    """
    clone, clone_params, rate = load_clone(FLAGS.checkpoint, input_size, FLAGS.error_scale,
                                           num_classes)
    sgd_lr = FLAGS.sgd_lr or rate
    if not np.isfinite(sgd_lr):
        raise app.UsageError(f"{FLAGS.checkpoint} has no clone learning rate in its "
                             "learner.json; pass --sgd_lr.")
    sgd = online_gd.tanh_linear_learner(input_size, num_classes, learning_rate=sgd_lr,
                                        init_scale=0.0)
    methods: Dict[str, Any] = {"cloned backprop": (clone, clone_params),
                               f"SGD (lr {sgd_lr:g})": (sgd, None)}
    hidden = [int(n) for n in FLAGS.hidden_sizes]
    if hidden:
        try:
            cfg = cloning.stacked_clone_config(clone.config, hidden, FLAGS.w_init_std)
        except ValueError as e:
            raise app.UsageError(f"--hidden_sizes: {e}") from e
        arch = "-".join(map(str, cfg.layer_sizes))
        methods[f"cloned backprop {arch}"] = (vsml_learner(cfg), clone_params.replace(cfg=cfg))
        methods[f"SGD {arch} (lr {sgd_lr:g})"] = (online_gd.tanh_linear_learner(
            input_size, num_classes, learning_rate=sgd_lr, hidden_sizes=hidden,
            init_std=FLAGS.w_init_std), None)
    if FLAGS.improved_checkpoint:
        imp, imp_params, _ = load_clone(FLAGS.improved_checkpoint, input_size,
                                        FLAGS.error_scale, num_classes)
        methods["clone + meta-training"] = (imp, imp_params)
    return methods, {"sgd_lr": sgd_lr, "clone_rate": rate, "input_size": input_size,
                     "num_classes": num_classes}


def load_data_split(ds: str, split: str):
    """One split of data set `ds` at the figure's input size."""
    return vdata.make_dataset(ds, split, data_dir=FLAGS.data_dir, pool=FLAGS.pool,
                              download=FLAGS.download, input_size=FLAGS.input_size or None)


class Progress:
    """The ETA of the whole figure, for the progress lines.

    The figure is a sequence of runs, one per (data set, method), of `steps`
    steps each. A method's seconds per step are measured on its first data set
    and reused for the later ones (all data sets share the input size); a
    method not run yet is assumed to cost the current rate scaled by its state
    size (the cloned cells dominate, SGD's weights cost next to nothing).
    """

    def __init__(self, steps: int):
        self.steps = steps
        self.rate: Dict[int, float] = {}   # method index -> measured s per step
        self.size: Dict[int, int] = {}     # method index -> state size (cost prior)
        self.pending: List[Tuple[str, int]] = []  # (data set, method index) to run
        self.current: Optional[Tuple[str, int]] = None
        self.t0 = 0.0

    def plan(self, datasets, sizes: List[int]) -> None:
        self.size = dict(enumerate(sizes))
        self.pending = [(ds, i) for ds in datasets for i in range(len(sizes))]

    def start(self, ds: str, index: int) -> None:
        self.current, self.t0 = (ds, index), time.perf_counter()

    def finish(self) -> None:
        self.rate[self.current[1]] = (time.perf_counter() - self.t0) / self.steps
        self.pending.remove(self.current)

    def eta_s(self, done: int) -> float:
        """Seconds left after `done` steps of the current run."""
        i = self.current[1]
        rate = ((time.perf_counter() - self.t0) / done if done
                else self.rate.get(i, 0.0))
        left = (self.steps - done) * rate
        for key in self.pending:
            if key != self.current:
                j = key[1]
                left += self.steps * self.rate.get(
                    j, rate * self.size.get(j, 1) / max(self.size.get(i, 1), 1))
        return left


def _eta(seconds: float) -> str:
    s = int(round(seconds))
    return f"ETA {s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


# evaluation.evaluate_method's progress lines start "NAME: DONE/TOTAL steps".
_DONE = re.compile(r": (\d+)/\d+ steps")


def run_dataset(ds: str, train, test, methods: Dict[str, Any], seeds, K: int,
                progress: Progress):
    """{method: MethodResult with the held-out curve} on one dataset (its
    train and test splits as Datasets)."""
    try:
        held_out = evaluation.held_out_set(test, FLAGS.test_examples)
    except ValueError as e:
        raise app.UsageError(f"{ds} test: {e}") from e
    streams = evaluation.make_streams(train, seeds, FLAGS.steps, stream_batch=K)
    results = {}

    def log(msg: str, name: str) -> None:
        done = _DONE.search(msg)
        eta = f" | {_eta(progress.eta_s(int(done.group(1))))}" if done else ""
        logging.info("%s %s: %s%s", ds, name, msg, eta)

    for index, (name, (learner, params)) in enumerate(methods.items()):
        progress.start(ds, index)
        results[name] = evaluation.evaluate_method(
            learner, params, streams, seeds, stream_batch=K, checkpoints=(),
            window=FLAGS.eval_every, held_out=held_out, held_out_every=FLAGS.eval_every,
            log=lambda msg, name=name: log(msg, name))
        progress.finish()
        final = results[name].summary["test_acc_final"]
        logging.info("%s %s: final test acc %.4f +- %.4f over %d seeds", ds, name,
                     final["mean"], final["std"], len(seeds))
    return results


def format_summary(summary: Dict[str, Dict[str, Dict[str, Any]]], seeds: int) -> str:
    """The table printed at the end: per data set and method, the final test
    accuracy (mean +- std over seeds) and the online accuracy over the last
    eval_every steps."""
    w = max(len(m) for per in summary.values() for m in per) + 2
    lines = []
    for ds, per in summary.items():
        lines.append(f"== {ds}: test accuracy on {FLAGS.test_examples} test images after "
                     f"{FLAGS.steps} steps, mean +- std over {seeds} seeds")
        lines.append(f"{'method':<{w}}{'test accuracy':>17}  online, last {FLAGS.eval_every}")
        for m, r in per.items():
            lines.append(f"{m:<{w}}{r['final_test_acc_mean']:>9.3f} +- "
                         f"{r['final_test_acc_std']:.3f}  {r['online_acc_last_chunk_mean']:>9.3f}")
    return "\n".join(lines)


def main(argv):
    del argv
    if not FLAGS.out_dir:
        raise app.UsageError("--out_dir is required.")
    # Locked while written; an out_dir with an earlier fig5.json is refused.
    with claim_out_dir(FLAGS.out_dir, "fig5.json"):
        draw()


def draw():
    try:
        side = vdata.target_side(FLAGS.input_size or None, FLAGS.pool)
        for ds in FLAGS.datasets:
            vdata.split_spec(ds)
    except ValueError as e:
        raise app.UsageError(f"--pool / --input_size / --datasets: {e}") from e
    seeds, K = list(range(FLAGS.seeds)), FLAGS.stream_batch
    t_start, progress = time.perf_counter(), Progress(FLAGS.steps)
    summary, curves, meta, panels, data_info = {}, {}, {}, {}, {}
    by_classes: Dict[int, Any] = {}  # one set of learners per class count
    for ds in FLAGS.datasets:
        train, test = load_data_split(ds, "train"), load_data_split(ds, "test")
        if train.num_classes != test.num_classes:
            raise app.UsageError(f"{ds}: the train split has {train.num_classes} classes, "
                                 f"the test split {test.num_classes}; both must label the "
                                 "same classes.")
        if train.num_classes not in by_classes:
            by_classes[train.num_classes] = load_methods(side * side, train.num_classes)
        methods, method_info = by_classes[train.num_classes]
        if not progress.size:  # the first data set: every run of the figure is known
            progress.plan(FLAGS.datasets, [
                evaluation.count_variables(lrn, p)["state_size"]
                for lrn, p in methods.values()])
        data_info[ds] = {"train": evaluation.describe_dataset(train),
                         "test": evaluation.describe_dataset(test)}
        results = run_dataset(ds, train, test, methods, seeds, K, progress)
        meta[ds] = method_info
        summary[ds] = {m: {"final_test_acc_mean": r.summary["test_acc_final"]["mean"],
                           "final_test_acc_std": r.summary["test_acc_final"]["std"],
                           "final_test_acc_per_seed": r.summary["test_acc_final"]["per_seed"],
                           # online accuracy over the last eval_every steps
                           "online_acc_last_chunk_mean": r.summary["final_window_acc"]["mean"]}
                       for m, r in results.items()}
        curves[ds] = {m: {"steps": r.test_steps.tolist(),
                          "examples_seen": (r.test_steps * max(K, 1)).tolist(),
                          "test_acc": r.test_acc.tolist(),  # [seed][step]
                          "test_acc_mean": r.test_acc.mean(axis=0).tolist(),
                          "test_acc_std": r.test_acc.std(axis=0).tolist()}
                      for m, r in results.items()}
        panels[PANEL_TITLES.get(ds, ds)] = {m: (r.test_steps, r.test_acc)
                                            for m, r in results.items()}
    json_path, png_path = (os.path.join(FLAGS.out_dir, "fig5.json"),
                           os.path.join(FLAGS.out_dir, "fig5.png"))
    with open(json_path, "w") as f:
        json.dump({"flags": {k: FLAGS[k].value for k in (
            "checkpoint", "improved_checkpoint", "datasets", "pool", "steps", "eval_every",
            "test_examples", "seeds", "stream_batch", "sgd_lr", "error_scale",
            "hidden_sizes", "w_init_std", "input_size", "data_dir", "download")},
            "seeds": seeds, "std": "over seeds, ddof=0", "data": data_info,
            "methods": meta, "summary": summary, "curves": curves}, f, indent=1)
    xlabel = ("training steps (one image each)" if not K else
              f"training steps ({K} images each, states averaged)")
    plotting.plot_held_out_curves(
        panels, png_path, xlabel=xlabel,
        ylabel=f"test accuracy ({FLAGS.test_examples} test images)",
        title=f"{len(seeds)} seeds (mean +- std), {side}x{side} inputs")
    print(format_summary(summary, len(seeds)))
    print(f"wrote {json_path} (curves per seed), {png_path} in "
          f"{time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    common.run(main, cluster_flags=False)
