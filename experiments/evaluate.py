r"""Meta-test learners on online streams of test data (paper fig. 6, and fig. 5 mode).

    python -m experiments.evaluate --checkpoint=WORKDIR|pretrained:NAME \
        --datasets=mnist,fashion_mnist --episode_length=2000 --seeds=10 \
        --baselines=adam,sgd,nearest_mean,meta_rnn:RNN_WORKDIR --out_dir=DIR

--datasets takes any data set spec: mnist, fashion_mnist, idx:DIR, npz:FILE,
tfds:NAME, and mixtures joined by "+" (--datasets=mnist+fashion_mnist,npz:letters.npz
is two entries). Held-out test curves with --test_every=M; the cloned-backprop
comparison of fig. 5 with the paper's batch averaging:

    python -m experiments.evaluate --checkpoint=pretrained:backprop_clone \
        --baselines=tanh_sgd --tanh_sgd_lr=clone --tanh_sgd_init_scale=0 \
        --stream_batch=64 --episode_length=1000 --test_every=100 --seeds=10 \
        --out_dir=DIR

A thin flag parser over `vsml_jax.runs.evaluate.meta_test` (see there for the
streams, the learning-rate sweeps and held-out tests, and what is written:
DIR/summary.json, DIR/curves.npz and figures named after the learner and the
data sets, e.g. DIR/pretrained_mnist_on_mnist_fashion_mnist.png, ..._window_accuracy.png
and, with --test_every, ..._test_accuracy.png), which also prints a table.
"""
from __future__ import annotations

from absl import app, flags

from experiments import common
from vsml_jax.runs.evaluate import EvaluateConfig, meta_test

FLAGS = flags.FLAGS
D = EvaluateConfig()  # defaults live in the config

flags.DEFINE_string("checkpoint", D.checkpoint, "Learner to meta-test: a meta_train "
                    "workdir (params.msgpack + learner.json) or pretrained:NAME. Optional "
                    "if only --baselines are evaluated.")
flags.DEFINE_string("label", D.label, "Name of the --checkpoint learner in tables and "
                    "plots (default: its name, pretrained:NAME or the workdir's folder name).")
common.define_data_flags(",".join(D.datasets), multi=True)
flags.DEFINE_list("baselines", list(D.baselines), "Also evaluate: adam, sgd (online "
                  "backprop, lr swept), tanh_sgd (y = tanh(x) W + b with SGD), "
                  "nearest_mean, nearest_neighbour, parzen (non-parametric; Parzen's one "
                  "setting is --parzen_bandwidth), and "
                  "meta-trained checkpoints as KIND:PATH with KIND in meta_rnn, hebbian, "
                  "vsml; prefix LABEL= to name an entry (e.g. 'Meta RNN=meta_rnn:runs/mrnn').")
flags.DEFINE_integer("episode_length", D.episode_length, "N: steps per stream (>= 1).")
flags.DEFINE_integer("seeds", D.seeds, "Streams (seeds) per dataset and method (>= 1).")
flags.DEFINE_integer("seed_offset", D.seed_offset, "Streams use seeds seed_offset ... + "
                     "seeds - 1.")
flags.DEFINE_string("split", "test", "Split the streams are drawn from (left at its "
                    "default with --test_every > 0: train).")
flags.DEFINE_integer("pool", D.pool, "Average-pool images by this factor (1: 784 inputs, "
                     "2: 196, 4: 49); -1 uses the checkpoint's.")
flags.DEFINE_integer("input_size", D.input_size, "D > 0: resize every image to sqrt(D) x "
                     "sqrt(D) (a square number, e.g. 64 for 8x8) instead of 28 // pool.")
flags.DEFINE_integer("shuffle_pixels", D.shuffle_pixels, "S >= 0: shuffle the input pixels "
                     "of every image (streams, sweep and held-out) by one fixed permutation "
                     "drawn with seed S, to test whether a learner uses where a pixel is "
                     "(-1: off).")
flags.DEFINE_integer("stream_batch", D.stream_batch, "K > 0: feed K examples per step "
                     "(batch-averaged VS-ML states / minibatch for Adam, SGD).")
flags.DEFINE_list("lrs", [f"{lr:g}" for lr in D.lrs], "Learning rates swept for adam / "
                  "sgd / tanh_sgd.")
flags.DEFINE_integer("sweep_seeds", D.sweep_seeds, "Streams per learning rate in the sweep.")
flags.DEFINE_integer("sweep_seed_offset", D.sweep_seed_offset, "Sweep streams use seeds "
                     "from here on (must not overlap the reported seeds).")
flags.DEFINE_string("sweep_split", D.sweep_split, "Split the sweep streams are drawn from.")
flags.DEFINE_integer("sweep_length", D.sweep_length, "Steps per sweep stream (0: "
                     "episode_length).")
flags.DEFINE_string("tanh_sgd_lr", D.tanh_sgd_lr, "Learning rate of tanh_sgd: empty sweeps "
                    "--lrs, a number fixes it, 'clone' takes the rate the --checkpoint was "
                    "cloned to implement (clone.lr x error_scale in its learner.json).")
flags.DEFINE_float("tanh_sgd_init_scale", D.tanh_sgd_init_scale, "tanh_sgd's weights start "
                   "N(0, s^2 / D); 0 starts from W = 0, b = 0 like the cloned learner "
                   "(fig. 5).")
flags.DEFINE_integer("test_every", D.test_every, "M > 0: test every learner on held-out "
                     "images after step 0 and every M steps (0: off).")
flags.DEFINE_integer("test_examples", D.test_examples, "Held-out images: the first N of "
                     "--test_split.")
flags.DEFINE_string("test_split", D.test_split, "Split the held-out images come from.")
flags.DEFINE_list("gd_hidden", [str(h) for h in D.gd_hidden], "Hidden layer sizes of the "
                  "adam/sgd network (empty: the single layer y = W x + b).")
flags.DEFINE_float("parzen_bandwidth", D.parzen_bandwidth, "Kernel width h of the parzen "
                   "baseline, in units of the per-input RMS distance (> 0; the default "
                   "is a compromise chosen on MNIST train streams at 7x7).")
flags.DEFINE_list("checkpoints", [str(n) for n in D.checkpoints],
                  "Report cumulative accuracy after these many steps (within [1, N]).")
flags.DEFINE_integer("window", D.window, "Steps in the final-window accuracy.")
flags.DEFINE_integer("chunk_size", D.chunk_size, "Run streams in pieces of this many steps "
                     "and print progress after each.")
flags.DEFINE_boolean("with_replacement", D.with_replacement, "Allow streams longer "
                     "than their split (examples then repeat; stated in summary.json).")
flags.DEFINE_string("out_dir", None, "Where summary.json and the figures go (locked "
                    "while written; must not hold a summary.json yet).")
flags.mark_flag_as_required("out_dir")


def _learning_rates(values) -> tuple:
    try:
        return tuple(float(v) for v in values if v != "")
    except ValueError:
        raise app.UsageError(f"--lrs={','.join(values)}: give numbers, e.g. "
                             "1e-3,1e-2.") from None


def main(argv):
    del argv
    cfg = common.config_from_flags(EvaluateConfig, unset_is_none=("split",),
                                   convert={"lrs": _learning_rates})
    meta_test(cfg, FLAGS.out_dir)


if __name__ == "__main__":
    common.run(main, cluster_flags=False)
