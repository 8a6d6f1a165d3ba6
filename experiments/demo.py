"""A first look: one online episode of an untrained VS-ML learner on real MNIST.

    python -m experiments.demo [--data_dir=DIR] [--episode_length=1000]

Feeds MNIST test images one per step to a randomly initialised VS Meta RNN
(the paper's 784 -> 10 LSTM layer) and prints the running loss and online
accuracy. An untrained V_M does not learn (accuracy stays near chance): this
shows the machinery, its sizes and its speed; `experiments.meta_train` makes
it learn.
"""
import time

import jax
import jax.numpy as jnp
from absl import app, flags

import vsml_jax
from vsml_jax import data as vdata

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Folder with mnist/ IDX files (default: $VSML_DATA_DIR).")
flags.DEFINE_integer("episode_length", 1000, "Examples in the online episode.", lower_bound=1)
flags.DEFINE_integer("report_every", 100, "Print progress every this many examples.",
                     lower_bound=1)
flags.DEFINE_integer("seed", 0, "Random seed (params, state and the stream).")


def main(argv):
    del argv
    cfg = vsml_jax.VSMLConfig(layer_sizes=(784, 10), hidden_size=16, msg_size=8, micro_ticks=2)
    print(f"VS Meta RNN {cfg.layer_sizes[0]} -> {cfg.layer_sizes[1]}, LSTM H={cfg.hidden_size}, "
          f"m={cfg.msg_size}, {cfg.micro_ticks} micro ticks")
    print(f"|V_M| = {vsml_jax.count_meta_variables(cfg):,} meta variables (shared by all cells)")
    print(f"|V_L| = {vsml_jax.count_learned_variables(cfg):,} learned variables (cell states)")

    dataset = vdata.make_dataset("mnist", "test", data_dir=FLAGS.data_dir)
    key_p, key_s, key_d = jax.random.split(jax.random.key(FLAGS.seed), 3)
    params = vsml_jax.init_params(key_p, cfg)
    state = vsml_jax.init_state(key_s, cfg)
    inputs, labels = vdata.sample_episode(key_d, dataset, FLAGS.episode_length)

    run_chunk = jax.jit(vsml_jax.unroll)
    chunk = FLAGS.report_every
    # Compile once on a chunk-sized piece so the timing below is the run alone.
    t0 = time.perf_counter()
    jax.block_until_ready(run_chunk(params, state, (inputs[:chunk], labels[:chunk])))
    print(f"compiled in {time.perf_counter() - t0:.1f} s")

    losses, correct = [], []
    t0 = time.perf_counter()
    for start in range(0, FLAGS.episode_length, chunk):
        stop = min(start + chunk, FLAGS.episode_length)
        state, out = run_chunk(params, state, (inputs[start:stop], labels[start:stop]))
        losses.append(out.loss)
        correct.append(out.correct)
        all_correct = jnp.concatenate(correct)
        print(f"examples {stop:5d}  loss(last {stop - start}) {float(jnp.mean(out.loss)):.3f}  "
              f"online accuracy {float(jnp.mean(all_correct)):.3f}")
    elapsed = time.perf_counter() - t0
    n = FLAGS.episode_length
    cell_ticks = n * cfg.micro_ticks * cfg.layer_sizes[0] * cfg.layer_sizes[1]
    print(f"episode of {n} steps in {elapsed:.2f} s: {n / elapsed:.0f} steps/s, "
          f"{cell_ticks / elapsed / 1e6:.1f} M cell micro-ticks/s on {jax.devices()[0].platform}")
    print("An untrained learner stays near chance (0.1); see README for meta-training.")


if __name__ == "__main__":
    app.run(main)
