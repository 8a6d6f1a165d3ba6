r"""Meta-training a learner from scratch (paper sec. 3.2, figure 6).

    python -m experiments.meta_train --flagfile=experiments/configs/quickstart.flags \
        --workdir=runs/quickstart

A thin flag parser over `vsml_jax.runs.meta_train.train_and_evaluate` (see
there for what the run does and writes). The same command runs on one CPU,
on all devices of a GPU machine, or as one multi-controller job over many
processes and hosts: start it on every process, with
--coordinator_address/--num_processes/--process_id where JAX cannot detect
the cluster itself (BUILD.md). Re-running it with the same --workdir resumes;
SIGTERM saves a checkpoint and stops cleanly.
"""
from __future__ import annotations

from absl import app, flags, logging

from experiments import common
from vsml_jax.runs.meta_train import ARCH_DEFAULTS, MetaTrainConfig, train_and_evaluate

FLAGS = flags.FLAGS
D = MetaTrainConfig()  # defaults live in the config

common.define_workdir_flag()
common.define_cluster_flags()
flags.DEFINE_enum("learner", D.learner, ["vsml", "meta_rnn"], "Which learner to meta-train.")
# VSMLConfig (architecture flags not given come from --init_checkpoint, if any)
flags.DEFINE_list("layer_sizes", None, "Neuron counts n_0,...,n_L. Default: (input "
                  "size, number of classes).")
flags.DEFINE_string("cell", ARCH_DEFAULTS["cell"], "Cell type of the VS-ML sub-RNNs "
                    "(lstm | vanilla).")
flags.DEFINE_integer("hidden_size", ARCH_DEFAULTS["hidden_size"], "H: state size of each "
                     "VS-ML cell (or Meta RNN hidden units).")
flags.DEFINE_integer("msg_size", ARCH_DEFAULTS["msg_size"], "m: size of forward/backward "
                     "messages.")
flags.DEFINE_integer("micro_ticks", ARCH_DEFAULTS["micro_ticks"], "RNN ticks per data point "
                     "per layer.")
flags.DEFINE_boolean("backward_interaction", ARCH_DEFAULTS["backward_interaction"],
                     "Backward messages between layers (eq. 14).")
flags.DEFINE_string("reduce", ARCH_DEFAULTS["reduce"], "Reduction of messages over cells "
                    "(mean | sum).")
flags.DEFINE_float("readout_scale", ARCH_DEFAULTS["readout_scale"],
                   "logits = readout_scale * output message.")
flags.DEFINE_boolean("readout_tanh", ARCH_DEFAULTS["readout_tanh"],
                     "Bound the read-out message with tanh.")
flags.DEFINE_float("error_scale", ARCH_DEFAULTS["error_scale"],
                   "The fed error is error_scale * (softmax - y).")
flags.DEFINE_boolean("feed_label", ARCH_DEFAULTS["feed_label"],
                     "Also feed the previous one-hot label.")
flags.DEFINE_string("protocol", ARCH_DEFAULTS["protocol"], "Online protocol "
                    "(delayed_error | predict_then_learn | predict_then_backprop).")
flags.DEFINE_float("state_clip", D.state_clip, "Clip of the cell states (<= 0: none).")
flags.DEFINE_float("init_std", ARCH_DEFAULTS["init_std"], "Std of the random initial "
                   "cell states.")
flags.DEFINE_boolean("tie_layers", ARCH_DEFAULTS["tie_layers"], "One V_M shared by all layers.")
flags.DEFINE_boolean("coordinates", ARCH_DEFAULTS["coordinates"], "Feed cells their grid "
                     "coordinates.")
flags.DEFINE_float("param_init_scale", D.param_init_scale, "Scale of the random V_M init.")
flags.DEFINE_string("dtype", ARCH_DEFAULTS["dtype"], "dtype of V_M and V_L (float32 | "
                    "bfloat16 | float16 | float64).")
# Data
common.define_data_flags("mnist")
flags.DEFINE_integer("pool", D.pool, "Average pooling of 28x28 images: 1, 2 or 4 "
                     "(784, 196 or 49 inputs).")
flags.DEFINE_integer("synthetic_size", D.synthetic_size, "Examples of --dataset=synthetic.")
flags.DEFINE_integer("episode_length", D.episode_length, "T: examples per episode.")
flags.DEFINE_integer("batch_size", D.batch_size, "Episodes per meta-loss (split over all "
                     "devices: a multiple of their number).")
flags.DEFINE_boolean("permute_labels", D.permute_labels, "Random label permutation per "
                     "episode.")
flags.DEFINE_boolean("random_projection", D.random_projection, "Random input projection "
                     "per episode.")
flags.DEFINE_integer("min_classes", D.min_classes, "0: every episode shows all classes; "
                     "2..C: k ~ U{min_classes..C} random classes per episode.")
flags.DEFINE_float("pixel_permute_prob", D.pixel_permute_prob, "Probability that an "
                   "episode's inputs are shuffled by a random permutation.")
flags.DEFINE_integer("min_length", D.min_length, "0: every episode has --episode_length "
                     "steps; 1..T: mixed lengths L ~ U{min_length..T} (the meta-loss "
                     "is its expectation: early steps weigh more). BPTT only.")
# Meta-optimisation
flags.DEFINE_string("meta_optimizer", D.meta_optimizer, "adam | sgd (BPTT) or an "
                    "evolution strategy: cma_es | open_es | snes | sep_cma_es | pgpe | ...")
flags.DEFINE_float("lr", D.lr, "Learning rate of adam/sgd (may change on resume).")
flags.DEFINE_integer("lr_decay_steps", D.lr_decay_steps, "Cosine decay of lr over this "
                     "many steps down to lr_final_fraction * lr (0: constant lr).")
flags.DEFINE_float("lr_final_fraction", D.lr_final_fraction, "Final lr of the cosine "
                   "decay, as a fraction of --lr, in [0, 1].")
flags.DEFINE_float("clip_norm", D.clip_norm, "Global-norm gradient clipping (0: off).")
flags.DEFINE_integer("popsize", D.popsize, "Population size of evolution strategies "
                     "(split over all devices: a multiple of their number).")
flags.DEFINE_float("sigma_init", D.sigma_init, "Initial std of evolution strategies.")
flags.DEFINE_float("es_lr", D.es_lr, "Adam learning rate of open_es.")
flags.DEFINE_string("member_batch", D.member_batch, "ES members evaluated at once on each "
                    "device: auto (1 on CPU, all on GPU/TPU), all (vmap), or a number.")
flags.DEFINE_integer("micro_batch", D.micro_batch, "BPTT gradient accumulation: run "
                     "the batch in groups of this many episodes (over all devices; "
                     "divides --batch_size, a multiple of the devices) and sum their "
                     "gradients inside the step. Less memory, the same gradient "
                     "(0: the whole batch at once; may change on resume).")
flags.DEFINE_boolean("remat", D.remat, "Rematerialise each step in BPTT (VS-ML).")
flags.DEFINE_list("remat_chunk", ["0"], "Chunked remat: k stores carries every k steps; "
                  "k1,k2 nests chunks (product divides T; 0: off).")
flags.DEFINE_enum("kernel", D.kernel, ["xla", "pallas"], "Step kernels of the VS-ML "
                  "grid: xla (default) or pallas (the LSTM micro ticks fused into one "
                  "Pallas kernel each way, in the training step; opt-in for TPU/GPU, "
                  "interpreted (slow) on CPU).")
flags.DEFINE_string("init_checkpoint", None, "Start from this portable learner (a "
                    "meta_train/clone workdir or pretrained:NAME); a VS-ML learner keeps "
                    "the checkpoint's architecture.")
common.define_schedule_flags(num_steps=D.num_steps, checkpoint_every=D.checkpoint_every,
                             log_every=D.log_every, eval_every=D.eval_every)
flags.DEFINE_integer("max_to_keep", D.max_to_keep, "Newest checkpoints kept (the first "
                     "one is kept too).")
flags.DEFINE_integer("restore_step", None, "Resume from this kept checkpoint (0: start "
                     "again from scratch); newer ones are moved to "
                     "WORKDIR/checkpoints_rolled_back/, never deleted.")
flags.DEFINE_boolean("allow_data_change", False, "Resume even though the training data "
                     "differ from those the checkpoint was trained on (recorded in "
                     "config.json).")
flags.DEFINE_list("eval_datasets", list(D.eval_datasets), "Meta-test data sets (test split).")
flags.DEFINE_integer("eval_length", D.eval_length, "Examples per meta-test episode.")
flags.DEFINE_integer("eval_episodes", D.eval_episodes, "Meta-test episodes per data set.")
flags.mark_flag_as_required("workdir")


def _remat_chunk(values) -> tuple:
    chunks = tuple(int(v) for v in values)
    return () if chunks in ((), (0,)) else chunks


def main(argv):
    del argv
    try:
        remat_chunk = _remat_chunk(FLAGS.remat_chunk)
    except ValueError:
        raise app.UsageError(f"--remat_chunk={','.join(FLAGS.remat_chunk)}: "
                                    "use integers, e.g. 10 or 10,10 (0: off).") from None
    cfg = common.config_from_flags(MetaTrainConfig, unset_is_none=ARCH_DEFAULTS,
                                   convert={"remat_chunk": lambda _: remat_chunk})
    outcome = train_and_evaluate(cfg, FLAGS.workdir, restore_step=FLAGS.restore_step,
                                 allow_data_change=FLAGS.allow_data_change)
    if outcome.preempted:
        logging.warning("Stopped by SIGTERM at step %d; the same command resumes.",
                        outcome.step)


if __name__ == "__main__":
    common.run(main)
