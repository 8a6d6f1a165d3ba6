"""A first look: the shipped meta-learned learner learning MNIST online, no gradients.

    python -m experiments.demo                    # pretrained:mnist on an MNIST test stream
    python -m experiments.demo --dataset=fashion_mnist --episode_length=2000
    python -m experiments.demo --checkpoint=runs/quickstart   # a meta_train workdir

Feeds one stream of test images, one image per step, to a learner that
predicts each label before it sees it and then learns from it in its forward
dynamics. Every --report_every examples it prints the cumulative online
accuracy (the fraction of predictions so far that were right) of, side by side
on the SAME stream:

  * the --checkpoint learner (default `pretrained:mnist`, the VS-ML layer
    meta-trained on MNIST train and shipped with the package);
  * online Adam training a linear classifier one example per step, its
    learning rate chosen like `experiments.evaluate` does: the best of
    --adam_lrs by online accuracy on streams of the *train* split with other
    seeds (`evaluation.sweep_learning_rate`; --adam_lr fixes it instead);
  * the same learner with untrained (randomly initialised) meta variables,
    which does not learn: what meta-learning adds.

The stream for --seed S is the one `experiments.evaluate` uses for seed S
(`vsml_jax.evaluation.make_streams`), and every learner starts from that
seed's initial state (`evaluation.init_key`). Compilation time and run speed
are printed at the end.
"""
import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from experiments import common

from vsml_jax import evaluation
from vsml_jax.baselines import online_gd
from vsml_jax.data import make_dataset
from vsml_jax.pretrained import LearnerFileError, load_learner
from vsml_jax.runs.common import SettingsError
from vsml_jax.runs.evaluate_settings import check_stream_length

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", "pretrained:mnist", "The learner: a meta_train workdir "
                    "(params.msgpack + learner.json) or pretrained:NAME.")
common.define_data_flags("mnist", multi=False)
flags.DEFINE_string("split", "test", "Split the stream is drawn from.")
flags.DEFINE_integer("pool", 0, "Average-pool images by this factor (1: 28x28, 4: 7x7); "
                     "0: the pooling the learner was trained with, 28x28 for "
                     "pretrained:mnist.", lower_bound=0)
flags.DEFINE_integer("episode_length", 1000, "Examples in the stream.", lower_bound=1)
flags.DEFINE_integer("report_every", 100, "Print a row every this many examples.",
                     lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the stream and of every learner's initial state.",
                     lower_bound=0)
flags.DEFINE_list("compare", ["adam", "untrained"], "Columns next to the learner: adam "
                  "(online Adam), untrained (the learner with random meta variables).")
flags.DEFINE_float("adam_lr", None, "Learning rate of online Adam (default: the best "
                   "of --adam_lrs on train-split streams).")
flags.DEFINE_list("adam_lrs", ["1e-3", "3e-3", "1e-2", "3e-2"], "Learning rates "
                  "swept for online Adam when --adam_lr is not given.")
flags.DEFINE_integer("sweep_seeds", 2, "Train-split streams per learning rate in the "
                     "sweep (seeds 1,000,000 on, as experiments.evaluate).", lower_bound=1)

flags.DEFINE_string("summary_json", None, "Also write the table, the learning rate and "
                    "the timings to this JSON file (docs/figures/demo_mnist.json is the "
                    "one README.md quotes); an existing file is never overwritten.")
flags.DEFINE_bool("with_replacement", False, "Allow a stream longer than the split: "
                  "examples repeat (stated in the output and --summary_json).")

# The sweep's streams: experiments.evaluate's default sweep seeds, never a
# reported seed.
SWEEP_SEED_OFFSET = 1_000_000

COMPARE = ("adam", "untrained")
DISPLAY_NAMES = {"vsml": "VS-ML", "meta_rnn": "Meta RNN", "hebbian": "Hebbian rule"}


def load(spec, input_size=None):
    try:
        return load_learner(spec, input_size=input_size)
    except LearnerFileError as e:
        raise app.UsageError(str(e)) from e


def _adam(input_dim: int, num_classes: int):
    return lambda lr: online_gd.online_gd_learner(input_dim, num_classes, optimizer="adam",
                                                  learning_rate=lr)


def adam_learning_rate(input_dim: int, num_classes: int, pool: int, length: int) -> float:
    """--adam_lr, or the best of --adam_lrs on train-split streams (printed)."""
    if FLAGS.adam_lr is not None:
        print(f"Online Adam: lr {FLAGS.adam_lr:g} (--adam_lr).")
        return FLAGS.adam_lr
    try:
        lrs = [float(v) for v in FLAGS.adam_lrs if v != ""]
    except ValueError:
        raise app.UsageError(f"--adam_lrs={','.join(FLAGS.adam_lrs)}: give numbers, "
                             "e.g. 1e-3,1e-2.") from None
    if not lrs:
        raise app.UsageError("--adam_lrs is empty; give rates to sweep or --adam_lr.")
    t0 = time.perf_counter()
    train = make_dataset(FLAGS.dataset, "train", data_dir=FLAGS.data_dir, pool=pool,
                         download=FLAGS.download)
    seeds = list(range(SWEEP_SEED_OFFSET, SWEEP_SEED_OFFSET + FLAGS.sweep_seeds))
    best, table = evaluation.sweep_learning_rate(
        _adam(input_dim, num_classes), lrs, evaluation.make_streams(train, seeds, length),
        seeds)
    scores = ", ".join(f"{r['lr']:g}: {r['score']:.3f}" for r in table)
    print(f"Online Adam: lr {best:g}, the best of a sweep on {len(seeds)} train-split "
          f"streams ({scores}; {time.perf_counter() - t0:.1f} s).")
    return best


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.compare) - set(COMPARE))
    if unknown:
        raise app.UsageError(f"--compare: {', '.join(unknown)} unknown; use a subset of "
                             f"{', '.join(COMPARE)}.")
    if FLAGS.summary_json and os.path.exists(FLAGS.summary_json):
        raise SettingsError(f"--summary_json={FLAGS.summary_json} exists (an earlier "
                            "run's); choose another file, or move it away to replace it.")
    probe = load(FLAGS.checkpoint)
    pool = FLAGS.pool or probe.pool or 1
    t0 = time.perf_counter()
    try:
        data = make_dataset(FLAGS.dataset, FLAGS.split, data_dir=FLAGS.data_dir, pool=pool,
                            download=FLAGS.download)
    except (ValueError, OSError) as e:  # unknown, missing or corrupt data set
        raise app.UsageError(f"--dataset={FLAGS.dataset}: {e}") from e
    t_data = time.perf_counter() - t0
    loaded = load(FLAGS.checkpoint, input_size=data.input_dim)
    learner = loaded.learner
    classes = getattr(learner.config, "num_classes", data.num_classes)
    if classes != data.num_classes:
        raise app.UsageError(f"{FLAGS.checkpoint} predicts {classes} classes; "
                             f"{FLAGS.dataset} has {data.num_classes}.")

    N, every, seed = FLAGS.episode_length, FLAGS.report_every, FLAGS.seed
    # A longer stream would repeat examples (a memorising learner then scores
    # far above what it learned): an error unless asked for.
    check_stream_length(FLAGS.dataset, data, FLAGS.split, N, 0, FLAGS.with_replacement,
                        print)
    # Seed S's stream of experiments.evaluate: [1, N, D] inputs, [1, N, C] one-hot labels.
    inputs, labels = evaluation.make_streams(data, [seed], N).materialize()
    inputs, labels = inputs[0], labels[0]
    side = int(round(data.input_dim ** 0.5))
    shape = f"{side}x{side}" if side * side == data.input_dim else f"{data.input_dim}"
    counts = evaluation.count_variables(learner, loaded.params)
    print(f"Learner {FLAGS.checkpoint}: {DISPLAY_NAMES.get(learner.name, learner.name)}, "
          f"{data.input_dim} inputs -> "
          f"{data.num_classes} classes, {counts['meta_variables']:,} meta variables, "
          f"{counts['learned_variables']:,} learned variables.")
    print(f"Stream: {N} {FLAGS.dataset} {FLAGS.split} images ({shape}, {data.input_dim} "
          f"inputs), seed {seed}, in random order; loaded in {t_data:.1f} s.")

    # (column title, learner, params, initial state)
    key = evaluation.init_key(seed)
    methods = [(FLAGS.checkpoint, learner, loaded.params, learner.init_state(key))]
    for kind in FLAGS.compare:
        if kind == "adam":
            lr = adam_learning_rate(data.input_dim, data.num_classes, pool, N)
            adam = online_gd.online_gd_learner(data.input_dim, data.num_classes,
                                               optimizer="adam", learning_rate=lr)
            methods.append((f"online Adam (lr {lr:g})", adam, None, adam.init_state(key)))
        else:
            params = learner.init_params(jax.random.fold_in(jax.random.key(seed), 2))
            name = DISPLAY_NAMES.get(learner.name, learner.name)
            methods.append((f"untrained {name}", learner, params,
                            learner.init_state(key)))

    # Compile every learner once per chunk length (ahead of time: the run below
    # is timed alone).
    t0 = time.perf_counter()
    compiled = {}
    for m, (_, lrn, params, state) in enumerate(methods):
        for length in sorted({min(every, N), N % every} - {0}):
            compiled[m, length] = jax.jit(lrn.unroll).lower(
                params, state, (inputs[:length], labels[:length])).compile()
    t_compile = time.perf_counter() - t0
    print(f"Compiled {len(compiled)} programs in {t_compile:.1f} s.")
    print()
    print("Cumulative online accuracy (each label is predicted before it is seen):")
    widths = [max(len(title), 5) for title, *_ in methods]
    print("examples  " + "  ".join(t.rjust(w) for (t, *_), w in zip(methods, widths)),
          flush=True)

    states = [state for *_, state in methods]
    correct = [[] for _ in methods]
    run_time = [0.0] * len(methods)
    for start in range(0, N, every):
        stop = min(start + every, N)
        chunk = (inputs[start:stop], labels[start:stop])
        row = []
        for m, (_, _, params, _) in enumerate(methods):
            t0 = time.perf_counter()
            states[m], out = compiled[m, stop - start](params, states[m], chunk)
            correct[m].append(np.asarray(out.correct))
            run_time[m] += time.perf_counter() - t0
            row.append(float(np.mean(np.concatenate(correct[m]))))
        print(f"{stop:8d}  " + "  ".join(f"{a:{w}.3f}" for a, w in zip(row, widths)),
              flush=True)

    print()
    for (title, *_), t in zip(methods, run_time):
        print(f"{title}: {N} examples in {t:.2f} s ({N / t:,.0f} examples/s)")
    print(f"Total: compile {t_compile:.1f} s + run {sum(run_time):.1f} s on "
          f"{jax.devices()[0].platform}.")
    if FLAGS.summary_json:
        stops = list(range(every, N, every)) + [N]
        summary = dict(
            checkpoint=FLAGS.checkpoint, dataset=FLAGS.dataset, split=FLAGS.split,
            seed=seed, episode_length=N, columns=[t for t, *_ in methods],
            cumulative_accuracy={str(stop): [round(float(np.mean(np.concatenate(c)[:stop])), 3)
                                             for c in correct] for stop in stops},
            run_s={t: round(r, 3) for (t, *_), r in zip(methods, run_time)},
            compile_s=round(t_compile, 3), platform=jax.devices()[0].platform,
            with_replacement=FLAGS.with_replacement)
        try:  # "x": a file another run wrote meanwhile is not overwritten either
            with open(FLAGS.summary_json, "x") as f:
                json.dump(summary, f, indent=1)
        except FileExistsError:
            raise SettingsError(f"--summary_json={FLAGS.summary_json} was written by "
                                "another run meanwhile; this run's table is printed "
                                "above.") from None
        print(f"wrote {FLAGS.summary_json}")


if __name__ == "__main__":
    common.run(main, cluster_flags=False)
