r"""Meta-training a learner from scratch (paper sec. 3.2, figure 6).

    python -m experiments.meta_train --flagfile=experiments/configs/quickstart.flags \
        --workdir=/tmp/vsml_quickstart

Episodes of `episode_length` examples are drawn from the training split of
`dataset` (a random label permutation per episode, optionally a random input
projection); the meta-loss is the online cross-entropy, minimised by BPTT with
Adam/SGD (`--meta_optimizer=adam|sgd`) or by an evosax strategy
(`--meta_optimizer=cma_es|open_es|...`, population sharded over all devices).

Everything is written to --workdir (config.json, checkpoints/, metrics.jsonl);
re-running the same command resumes. Every `eval_every` steps the learner is
meta-tested: cumulative online accuracy on held-out episodes of the *test*
splits of `eval_datasets` (split "eval/<dataset>" in metrics.jsonl). At the
end the portable learner is written: workdir/params.msgpack (flax msgpack of
the params) + workdir/learner.json (config, flags, meta-training summary).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import jax
import numpy as np
from absl import app, flags, logging

from vsml_jax import pretrained
from vsml_jax.config import CELLS, PROTOCOLS, REDUCTIONS, VSMLConfig
from vsml_jax.learners import Learner, vsml_learner
from vsml_jax.meta import sharding
from vsml_jax.meta.objective import EpisodeSpec, meta_test_accuracy
from vsml_jax.training import checkpointing, loop

GRADIENT_OPTIMIZERS = ("adam", "sgd")

# ----------------------------------------------------------------- flags
flags.DEFINE_string("workdir", None, "Folder of the run (created; resumed if it exists).")
flags.DEFINE_enum("learner", "vsml", ["vsml", "meta_rnn"], "Which learner to meta-train.")
# VSMLConfig
flags.DEFINE_list("layer_sizes", None, "Neuron counts n_0,...,n_L. Default: (input "
                  "size, 10); n_0 must equal the input size (784/196/49 for pool 1/2/4).")
flags.DEFINE_enum("cell", "lstm", list(CELLS), "Cell type of the VS-ML sub-RNNs.")
flags.DEFINE_integer("hidden_size", 16, "H: state size of each VS-ML cell (or Meta RNN hidden).")
flags.DEFINE_integer("msg_size", 8, "m: size of forward/backward messages.")
flags.DEFINE_integer("micro_ticks", 2, "RNN ticks per data point per layer.")
flags.DEFINE_boolean("backward_interaction", True, "Backward messages between layers (eq. 14).")
flags.DEFINE_enum("reduce", "mean", list(REDUCTIONS), "Reduction of messages over cells.")
flags.DEFINE_float("readout_scale", 1.0, "logits = readout_scale * output message.")
flags.DEFINE_boolean("readout_tanh", False, "Bound the read-out message with tanh.")
flags.DEFINE_float("error_scale", 1.0, "The fed error is error_scale * (softmax - y).")
flags.DEFINE_boolean("feed_label", False, "Also feed the previous one-hot label.")
flags.DEFINE_enum("protocol", "delayed_error", list(PROTOCOLS), "Online protocol.")
flags.DEFINE_float("state_clip", 4.0, "Clip of the cell states (<= 0: no clipping).")
flags.DEFINE_float("init_std", 0.5, "Std of the random initial cell states.")
flags.DEFINE_boolean("tie_layers", True, "One V_M shared by all layers.")
flags.DEFINE_boolean("coordinates", False, "Feed cells their grid coordinates.")
flags.DEFINE_float("param_init_scale", 1.0, "Scale of the random V_M initialisation.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16", "float64"],
                  "dtype of V_M and V_L.")
# Data
flags.DEFINE_enum("dataset", "mnist", ["mnist", "fashion_mnist", "synthetic"],
                  "Meta-training dataset (training split).")
flags.DEFINE_enum("pool", "1", ["1", "2", "4"], "Average pooling: 28x28 -> 28/14/7 "
                  "pixels per side (784/196/49 inputs).")
flags.DEFINE_string("data_dir", os.environ.get("VSML_DATA_DIR"),
                    "Folder with mnist/ and fashion_mnist/ IDX files "
                    "(default: $VSML_DATA_DIR).")
flags.DEFINE_integer("synthetic_size", 1000, "Examples of the synthetic dataset.")
flags.DEFINE_integer("episode_length", 100, "T: examples per meta-training episode.")
flags.DEFINE_integer("batch_size", 4, "Episodes per meta-loss evaluation.")
flags.DEFINE_boolean("permute_labels", True, "Random label permutation per episode.")
flags.DEFINE_boolean("random_projection", False, "Random input projection per episode.")
# Meta-optimisation
flags.DEFINE_string("meta_optimizer", "adam", "adam | sgd (BPTT) or an evolution "
                    "strategy: cma_es | open_es | snes | sep_cma_es | pgpe | ...")
flags.DEFINE_float("lr", 1e-2, "Learning rate of adam/sgd.")
flags.DEFINE_integer("lr_decay_steps", 0, "Cosine decay of lr over this many steps "
                     "down to lr_final_fraction * lr (0: constant lr).")
flags.DEFINE_float("lr_final_fraction", 0.1, "Final lr of the cosine decay, as a "
                   "fraction of --lr.")
flags.DEFINE_float("clip_norm", 1.0, "Global-norm gradient clipping (0: off).")
flags.DEFINE_integer("popsize", 16, "Population size of evolution strategies.")
flags.DEFINE_float("sigma_init", 0.1, "Initial std of evolution strategies.")
flags.DEFINE_float("es_lr", 0.01, "Adam learning rate of open_es.")
flags.DEFINE_string("member_batch", "auto", "ES members evaluated at once on each "
                    "device: auto (1 on CPU, all on GPU/TPU), all (vmap), or a number "
                    "(lax.map over chunks). Same fitness either way; speed differs.")
flags.DEFINE_integer("num_steps", 1000, "Meta-training steps (generations for ES).")
flags.DEFINE_boolean("remat", True, "Rematerialise each step in BPTT (VS-ML).")
flags.DEFINE_list("remat_chunk", ["0"], "Chunked remat: k stores carries every k "
                  "steps; k1,k2 nests chunks for long episodes (product divides T; "
                  "0: off). See vsml_jax.network.remat_chunks.")
flags.DEFINE_string("init_checkpoint", None, "Start from this portable learner (a "
                    "meta_train/clone workdir or pretrained:NAME) instead of random; "
                    "a VS-ML learner keeps the checkpoint's architecture.")
flags.DEFINE_integer("seed", 0, "Seed of params, episodes and states.")
# Bookkeeping
flags.DEFINE_integer("checkpoint_every", 100, "Steps between checkpoints.")
flags.DEFINE_integer("log_every", 10, "Steps between progress logs.")
flags.DEFINE_integer("eval_every", 0, "Steps between meta-tests (0: none).")
flags.DEFINE_list("eval_datasets", ["mnist", "fashion_mnist"],
                  "Meta-test datasets (test split).")
flags.DEFINE_integer("eval_length", 1000, "Examples per meta-test episode.")
flags.DEFINE_integer("eval_episodes", 2, "Meta-test episodes per dataset.")
flags.DEFINE_boolean("distributed", False, "Call jax.distributed.initialize() (also "
                     "done automatically when a multi-host job is detected).")

FLAGS = flags.FLAGS
flags.mark_flag_as_required("workdir")
for _name in ("hidden_size", "msg_size", "micro_ticks", "episode_length", "batch_size",
              "num_steps", "checkpoint_every", "log_every", "popsize", "eval_length",
              "eval_episodes", "synthetic_size"):
    flags.register_validator(_name, lambda v: v >= 1, message=f"--{_name} must be >= 1.")
flags.register_validator("lr", lambda v: v > 0, message="--lr must be positive.")
flags.register_validator("lr_decay_steps", lambda v: v >= 0,
                         message="--lr_decay_steps must be >= 0 (0: constant lr).")
flags.register_validator("sigma_init", lambda v: v > 0,
                         message="--sigma_init must be positive.")
flags.register_validator("clip_norm", lambda v: v >= 0,
                         message="--clip_norm must be >= 0 (0 disables clipping).")
flags.register_validator("eval_every", lambda v: v >= 0,
                         message="--eval_every must be >= 0 (0 disables meta-tests).")


def parse_remat_chunk(values) -> tuple:
    """--remat_chunk as a tuple of chunk sizes (() = off)."""
    chunks = tuple(int(v) for v in values)
    return () if chunks in ((), (0,)) else chunks


@flags.multi_flags_validator(["remat_chunk", "episode_length"],
                             message="--remat_chunk must be 0, or positive integers whose "
                             "product divides --episode_length (e.g. 10 or 10,10).")
def _check_chunk(d):
    try:
        chunks = parse_remat_chunk(d["remat_chunk"])
    except ValueError:
        return False
    return all(k >= 1 for k in chunks) and d["episode_length"] % math.prod(chunks or (1,)) == 0


@flags.validator("meta_optimizer", message="--meta_optimizer must be adam, sgd or an "
                 "evolution strategy name (cma_es, open_es, snes, sep_cma_es, pgpe, ... "
                 "or an evosax class name such as CMA_ES).")
def _check_meta_optimizer(value):
    if value in GRADIENT_OPTIMIZERS:
        return True
    from vsml_jax.meta.evolution import strategy_class
    try:
        strategy_class(value)
    except ValueError:
        return False
    return True


RUN_FLAGS = (
    "learner", "layer_sizes", "cell", "hidden_size", "msg_size", "micro_ticks",
    "backward_interaction", "reduce", "readout_scale", "readout_tanh", "error_scale",
    "feed_label", "protocol", "state_clip", "init_std", "tie_layers", "coordinates",
    "param_init_scale", "dtype", "dataset", "pool", "data_dir", "synthetic_size",
    "episode_length", "batch_size", "permute_labels", "random_projection",
    "meta_optimizer", "lr", "lr_decay_steps", "lr_final_fraction", "clip_norm", "popsize", "sigma_init", "es_lr", "num_steps",
    "remat", "remat_chunk", "init_checkpoint", "seed", "checkpoint_every", "log_every",
    "eval_every", "eval_datasets", "eval_length", "eval_episodes", "workdir")
SAFE_TO_CHANGE = loop.DEFAULT_SAFE_TO_CHANGE + ("eval_datasets", "eval_length",
                                                "eval_episodes", "distributed",
                                                "member_batch")


def parse_member_batch(value: str):
    """--member_batch: "auto" | "all" (-> None, vmap) | a positive integer."""
    if value in ("auto", "all"):
        return None if value == "all" else "auto"
    if not value.isdigit() or int(value) < 1:
        raise app.UsageError(f"--member_batch={value!r}: use auto, all or a positive "
                             "integer.")
    return int(value)


def run_config() -> dict:
    """The flags that define this run (stored in config.json and learner.json)."""
    return {name: FLAGS[name].value for name in RUN_FLAGS}


# ------------------------------------------------------------- building
def load_train_data(input_pool: int):
    from vsml_jax import data as vdata
    if FLAGS.dataset == "synthetic":
        return vdata.synthetic_dataset(jax.random.PRNGKey(FLAGS.seed + 1),
                                       FLAGS.synthetic_size, (28 // input_pool) ** 2)
    return vdata.make_dataset(FLAGS.dataset, "train", data_dir=FLAGS.data_dir,
                              pool=input_pool)


def vsml_config(input_size: int, num_classes: int) -> VSMLConfig:
    if FLAGS.layer_sizes:
        sizes = tuple(int(n) for n in FLAGS.layer_sizes)
        if sizes[0] != input_size or sizes[-1] != num_classes:
            raise app.UsageError(
                f"--layer_sizes={','.join(FLAGS.layer_sizes)} must start with the input "
                f"size {input_size} (dataset {FLAGS.dataset}, --pool={FLAGS.pool}) and "
                f"end with the {num_classes} classes, e.g. "
                f"--layer_sizes={input_size},{num_classes}.")
    else:
        sizes = (input_size, num_classes)
    return VSMLConfig(
        layer_sizes=sizes, cell=FLAGS.cell, hidden_size=FLAGS.hidden_size,
        msg_size=FLAGS.msg_size, micro_ticks=FLAGS.micro_ticks,
        backward_interaction=FLAGS.backward_interaction, reduce=FLAGS.reduce,
        readout_scale=FLAGS.readout_scale, readout_tanh=FLAGS.readout_tanh,
        error_scale=FLAGS.error_scale, feed_label=FLAGS.feed_label,
        protocol=FLAGS.protocol,
        state_clip=FLAGS.state_clip if FLAGS.state_clip > 0 else None,
        init_std=FLAGS.init_std, tie_layers=FLAGS.tie_layers,
        coordinates=FLAGS.coordinates, param_init_scale=FLAGS.param_init_scale,
        dtype=FLAGS.dtype)


# Flags that describe the VS-ML architecture, by VSMLConfig field. With
# --init_checkpoint the architecture comes from the checkpoint instead.
ARCH_FLAGS = {"cell": "cell", "hidden_size": "hidden_size", "msg_size": "msg_size",
              "micro_ticks": "micro_ticks", "backward_interaction": "backward_interaction",
              "reduce": "reduce", "readout_scale": "readout_scale",
              "readout_tanh": "readout_tanh", "error_scale": "error_scale",
              "feed_label": "feed_label", "protocol": "protocol", "init_std": "init_std",
              "tie_layers": "tie_layers", "coordinates": "coordinates", "dtype": "dtype"}


def load_init_checkpoint(input_size: int) -> Optional[pretrained.LoadedLearner]:
    """--init_checkpoint (a workdir or pretrained:NAME) loaded once, or None.

    Raises UsageError if it is unreadable, holds another kind of learner than
    --learner, or an architecture flag given on the command line or in a
    flagfile disagrees with it: the stored meta variables only make sense in
    the architecture they were trained in, which the run then keeps.
    """
    if not FLAGS.init_checkpoint:
        return None
    try:
        loaded = pretrained.load_learner(FLAGS.init_checkpoint, input_size=input_size)
    except pretrained.LearnerFileError as e:
        raise app.UsageError(f"--init_checkpoint: {e}") from e
    if loaded.learner.name != FLAGS.learner:
        raise app.UsageError(f"--init_checkpoint={FLAGS.init_checkpoint} holds a "
                             f"{loaded.learner.name} learner, not --learner={FLAGS.learner}.")
    _check_architecture_flags(loaded.learner.config)
    logging.info("Starting from the %s learner in %s.", loaded.learner.name,
                 FLAGS.init_checkpoint)
    return loaded


# The Meta RNN's architecture flags (MetaRNNConfig field by flag).
META_RNN_ARCH_FLAGS = {"hidden_size": "hidden_size"}


def _check_architecture_flags(cfg) -> None:
    """UsageError if an architecture flag that was given disagrees with `cfg`
    (the VSMLConfig or MetaRNNConfig stored in --init_checkpoint)."""
    vsml = isinstance(cfg, VSMLConfig)
    arch = ARCH_FLAGS if vsml else META_RNN_ARCH_FLAGS
    clashes = [f"--{flag}={FLAGS[flag].value} (checkpoint: {getattr(cfg, field)})"
               for flag, field in arch.items()
               if FLAGS[flag].present and FLAGS[flag].value != getattr(cfg, field)]
    if (vsml and FLAGS.layer_sizes
            and tuple(int(n) for n in FLAGS.layer_sizes) != cfg.layer_sizes):
        clashes.append(f"--layer_sizes={','.join(FLAGS.layer_sizes)} (checkpoint with "
                       f"this input size: {','.join(map(str, cfg.layer_sizes))})")
    if clashes:
        raise app.UsageError(
            "the architecture comes from --init_checkpoint, but these flags disagree "
            f"with it: {'; '.join(clashes)}. Drop them (or start from scratch).")


def build_learner(input_size: int, num_classes: int, train: bool = True,
                  init: Optional[pretrained.LoadedLearner] = None) -> Learner:
    """The learner named by --learner (remat only for the training unroll).

    The architecture comes from `init` (the loaded --init_checkpoint) if
    given, else from the flags.
    """
    if FLAGS.learner == "meta_rnn":
        if init is not None:
            return init.learner
        from vsml_jax.baselines.meta_rnn import meta_rnn_learner  # optional module
        return meta_rnn_learner(input_size, num_classes, FLAGS.hidden_size)
    cfg = init.learner.config if init is not None else vsml_config(input_size, num_classes)
    kwargs = {}
    chunks = parse_remat_chunk(FLAGS.remat_chunk)
    if train and chunks:
        kwargs["remat_chunk"] = chunks
    elif train and FLAGS.remat:
        kwargs["remat"] = True
    return vsml_learner(cfg, **kwargs)


def learner_config_dict(learner: Learner) -> dict:
    if isinstance(learner.config, VSMLConfig):
        return checkpointing.vsml_config_to_dict(learner.config)
    cfg = learner.config
    if hasattr(cfg, "__dataclass_fields__"):
        import dataclasses
        return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    return json.loads(json.dumps(cfg, default=str)) if cfg is not None else {}


def make_eval_fn(learner: Learner, params_of, input_pool: int):
    """state -> {"eval/<dataset>": cumulative accuracies} on the test splits."""
    from vsml_jax import data as vdata
    tests = {name: vdata.make_dataset(name, "test", data_dir=FLAGS.data_dir,
                                      pool=input_pool)
             for name in FLAGS.eval_datasets}
    key = jax.random.PRNGKey(FLAGS.seed + 12345)  # fixed: evals are comparable
    length, episodes = FLAGS.eval_length, FLAGS.eval_episodes

    @jax.jit
    def evaluate(params, test):
        return meta_test_accuracy(learner, params, key, test, length, episodes)

    def eval_fn(state):
        params = params_of(state)
        return {f"eval/{name}": evaluate(params, test) for name, test in tests.items()}
    return eval_fn


# ------------------------------------------------------------------ main
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.distributed or sharding.multihost_env_detected():
        sharding.maybe_initialize_distributed(force=True)
    workdir = FLAGS.workdir
    pool = int(FLAGS.pool)
    train_data = load_train_data(pool)
    num_classes, input_size = train_data.num_classes, train_data.input_dim
    init = load_init_checkpoint(input_size)
    learner = build_learner(input_size, num_classes, train=True, init=init)
    spec = EpisodeSpec(length=FLAGS.episode_length, batch=FLAGS.batch_size,
                       permute_labels=FLAGS.permute_labels,
                       random_projection=FLAGS.random_projection)
    init_params = init.params if init is not None else None

    if FLAGS.meta_optimizer in GRADIENT_OPTIMIZERS:
        from vsml_jax.meta import gradient
        optimizer = gradient.make_optimizer(
            FLAGS.meta_optimizer, FLAGS.lr, FLAGS.clip_norm or None,
            decay_steps=FLAGS.lr_decay_steps, final_lr_fraction=FLAGS.lr_final_fraction)
        init_fn = gradient.make_init_fn(learner, optimizer, FLAGS.seed, init_params)
        step_fn = gradient.make_step_fn(learner, optimizer, train_data, spec)
        params_of = lambda state: state.params
    else:
        from vsml_jax.meta import evolution
        solution = learner.init_params(jax.random.PRNGKey(0))
        strategy, es_params = evolution.make_strategy(
            FLAGS.meta_optimizer, FLAGS.popsize, solution, FLAGS.sigma_init, FLAGS.es_lr)
        mesh = sharding.population_mesh()
        if FLAGS.popsize % mesh.devices.size:
            raise app.UsageError(
                f"--popsize={FLAGS.popsize} must be a multiple of the "
                f"{mesh.devices.size} devices the population is sharded over.")
        init_fn = evolution.make_init_fn(learner, strategy, es_params, FLAGS.seed,
                                         init_params)
        step_fn = evolution.make_step_fn(learner, strategy, es_params, train_data, spec,
                                         mesh, parse_member_batch(FLAGS.member_batch))
        params_of = lambda state: evolution.mean_params(strategy, state)

    eval_fn = None
    if FLAGS.eval_every:
        eval_learner = build_learner(input_size, num_classes, train=False, init=init)
        eval_fn = make_eval_fn(eval_learner, params_of, pool)

    logging.info("Meta-training %s (%s) in %s", learner.name, FLAGS.meta_optimizer,
                 workdir)
    t0 = time.time()
    state = loop.run(workdir, init_fn, step_fn, FLAGS.num_steps, config_dict=run_config(),
                     checkpoint_every=FLAGS.checkpoint_every, log_every=FLAGS.log_every,
                     eval_fn=eval_fn, eval_every=FLAGS.eval_every,
                     safe_to_change=SAFE_TO_CHANGE)
    write_learner(workdir, learner, params_of(state), input_size, time.time() - t0)


def write_learner(workdir: str, learner: Learner, params, input_size: int,
                  seconds: float) -> None:
    """workdir/params.msgpack + workdir/learner.json (the portable learner)."""
    records = loop.read_metrics(workdir)
    train = [r for r in records if r["split"] == "train"]
    last = train[-50:]
    evals = {}
    for r in records:
        if r["split"].startswith("eval/"):
            evals[r["split"][5:]] = r
    extra = {
        "flags": run_config(),
        "input": {"dataset": FLAGS.dataset, "pool": int(FLAGS.pool),
                  "input_size": input_size},
        "meta_training": {
            "steps": train[-1]["step"] if train else 0,
            "meta_optimizer": FLAGS.meta_optimizer,
            "final_meta_loss": float(np.mean([r["loss"] for r in last])) if last else None,
            "final_meta_loss_window": len(last),
            "seconds_this_session": round(seconds, 1),
        },
        "final_eval": evals,
    }
    checkpointing.save_learner_dir(workdir, params, learner_config_dict(learner), extra,
                                   learner=learner.name)
    logging.info("Wrote %s/params.msgpack and %s/learner.json", workdir, workdir)


if __name__ == "__main__":
    app.run(main)
