r"""Learning algorithm cloning (paper sec. 3.1, appendix B, table 1).

    python -m experiments.clone --stage=backprop \
        --flagfile=experiments/configs/clone_backprop_cpu.flags --workdir=/tmp/clone_bp

Optimises V_M with Adam on random data so that every LSTM cell stores a weight
w and bias b, computes y = tanh(x) w + b (``--stage=forward``, eq. 13) and, for
``--stage=backprop``, applies w <- w - lr e tanh(x), b <- b - lr e and sends
back e' = e w (1 - tanh(x)^2) (see `vsml_jax.cloning` for the conventions).
The K training cells persist from step to step (restarting with probability
``reset_prob``) so that states of every age are trained.

Everything goes to --workdir (config.json, checkpoints/, metrics.jsonl;
re-running resumes). Every ``eval_every`` steps two evaluations are logged:
split "eval" (the cloning metrics on a fixed batch of fresh cells) and
"eval_long" (errors after a free run of ``eval_long_steps`` steps, exact rule
never re-synchronised). At the end the portable learner is written:
workdir/params.msgpack + workdir/learner.json, a `VSMLConfig` for a
``meta_test_layer_sizes`` network, so

    python -m experiments.evaluate --checkpoint=/tmp/clone_bp

meta-tests the cloned learning algorithm (no gradient computed anywhere).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from vsml_jax import cloning
from vsml_jax.meta import gradient
from vsml_jax.params import init_params
from vsml_jax.training import checkpointing, loop

flags.DEFINE_string("workdir", None, "Folder of the run (created; resumed if it exists).")
flags.DEFINE_enum("stage", "backprop", list(cloning.STAGES),
                  "forward: clone y = tanh(x) w + b; backprop: also the updates and e'.")
# The cell (V_M shapes) and the meta-test network it is saved for.
flags.DEFINE_integer("hidden_size", 32, "H: LSTM cell size (table 1: 32).")
flags.DEFINE_integer("msg_size", 4, "m: message size (slot 0 carries x, y, e, e').")
flags.DEFINE_integer("micro_ticks", 2, "LSTM ticks per pass (predict and learn pass).")
flags.DEFINE_list("meta_test_layer_sizes", ["784", "10"],
                  "Network the saved learner runs (V_M does not depend on it).")
flags.DEFINE_float("w_init_std", 0.0, "Std of the initial weights w at meta-test.")
flags.DEFINE_float("error_scale", 1.0, "Saved config's error_scale: scales e, and so the "
                   "learning rate, at meta-test.")
# What is cloned, on which data (vsml_jax.cloning.CloneSpec).
flags.DEFINE_float("target_scale", 20.0, "s: w, b and y are represented divided by s "
                   "(appendix B: 20).")
flags.DEFINE_float("rule_lr", 0.02, "Learning rate of the cloned rule (true units); "
                   "rule_lr / target_scale is the stored update per unit e tanh(x).")
flags.DEFINE_float("x_std", 2.0, "x ~ N(0, x_std^2) (table 1: random data std 2).")
flags.DEFINE_float("w_max", 10.0, "Training weights w ~ U(-w_max, w_max).")
flags.DEFINE_float("b_max", 10.0, "Training biases b ~ U(-b_max, b_max).")
flags.DEFINE_float("e_max", 1.0, "Largest |e| of the training errors.")
flags.DEFINE_float("e_decades", 0.0, "|e| spans this many decades below e_max.")
flags.DEFINE_integer("unroll_steps", 4, "Consecutive steps per training unroll.")
flags.DEFINE_float("fwd_unit", 1.0, "Unit of the y and e' residuals (true units).")
flags.DEFINE_float("store_unit", 1.0, "Unit of the stored-w/b residuals, as a fraction "
                   "of rule_lr.")
flags.DEFINE_float("x_repeat_prob", 0.0, "Probability that a training cell sees one x "
                   "for a whole unroll.")
flags.DEFINE_float("bias_lr_scale", 1.0, "Cloned bias update: b <- b - bias_lr_scale "
                   "rule_lr e (0: b stays fixed; see cloning.CloneSpec).")
flags.DEFINE_float("fwd_weight", 1.0, "Weight of the forward-output loss.")
flags.DEFINE_float("store_weight", 1.0, "Weight of the stored-w/b losses.")
flags.DEFINE_float("bwd_weight", 1.0, "Weight of the e' loss.")
flags.DEFINE_float("huber_delta", 1.0, "Smooth-L1 transition point (in those units).")
# Optimisation.
flags.DEFINE_integer("batch_size", 256, "K: cells per step (table 1: 32,768).")
flags.DEFINE_integer("num_steps", 10000, "Adam steps (table 1: 10^6).")
flags.DEFINE_float("lr", 5e-3, "Adam learning rate (table 1: 5e-3).")
flags.DEFINE_float("lr_final_fraction", 1.0, "Cosine decay of lr to this fraction of it "
                   "over lr_decay_steps (1: constant).")
flags.DEFINE_integer("lr_decay_steps", 0, "Length of the cosine decay (0: num_steps). "
                     "Set it explicitly to extend a run without changing its schedule.")
flags.DEFINE_float("clip_norm", 0.0, "Clip the gradient's global norm (0: off).")
flags.DEFINE_float("reset_prob", 0.01, "Per step, a training cell restarts from a "
                   "fresh (w, b) with this probability (1: no persistence).")
flags.DEFINE_float("max_drift", 3.0, "A training cell also restarts when its stored "
                   "w or b is this far (units of rule_lr) from the exact trajectory.")
flags.DEFINE_boolean("learned_encoding", True, "Learn how states holding (w, b) look "
                     "beyond the two fixed slots (cloning.StateEncoding).")
flags.DEFINE_string("init_checkpoint", None, "Start V_M from this portable learner "
                    "(e.g. the forward stage's workdir).")
flags.DEFINE_integer("seed", 0, "Seed of V_M's initialisation and of the data.")
flags.DEFINE_integer("checkpoint_every", 1000, "Checkpoint every this many steps.")
flags.DEFINE_integer("log_every", 100, "Log every this many steps.")
flags.DEFINE_integer("eval_every", 1000, "Evaluate every this many steps (0: never).")
flags.DEFINE_integer("eval_cells", 512, "Cells of the evaluations.")
flags.DEFINE_integer("eval_long_steps", 300, "Steps of the free-run evaluation.")
FLAGS = flags.FLAGS

RUN_FLAGS = (
    "stage", "hidden_size", "msg_size", "micro_ticks", "meta_test_layer_sizes",
    "w_init_std", "error_scale", "target_scale", "rule_lr", "x_std", "w_max", "b_max",
    "e_max", "e_decades", "unroll_steps", "fwd_unit", "store_unit", "x_repeat_prob", "bias_lr_scale",
    "fwd_weight", "store_weight",
    "bwd_weight", "huber_delta", "batch_size", "num_steps", "lr", "lr_final_fraction",
    "lr_decay_steps", "clip_norm", "reset_prob", "max_drift", "learned_encoding", "init_checkpoint", "seed",
    "checkpoint_every", "log_every", "eval_every", "eval_cells", "eval_long_steps",
    "workdir")
SAFE_TO_CHANGE = loop.DEFAULT_SAFE_TO_CHANGE + ("eval_cells", "eval_long_steps")


def run_config() -> dict:
    """The flags that define this run (config.json and learner.json)."""
    return {name: FLAGS[name].value for name in RUN_FLAGS}


def make_spec() -> cloning.CloneSpec:
    return cloning.CloneSpec(
        target_scale=FLAGS.target_scale, lr=FLAGS.rule_lr, x_std=FLAGS.x_std,
        w_max=FLAGS.w_max, b_max=FLAGS.b_max, e_max=FLAGS.e_max,
        e_decades=FLAGS.e_decades, steps=FLAGS.unroll_steps, fwd_unit=FLAGS.fwd_unit,
        store_unit=FLAGS.store_unit, x_repeat_prob=FLAGS.x_repeat_prob,
        bias_lr_scale=FLAGS.bias_lr_scale,
        fwd_weight=FLAGS.fwd_weight, store_weight=FLAGS.store_weight,
        bwd_weight=FLAGS.bwd_weight, huber_delta=FLAGS.huber_delta)


def make_config():
    return cloning.clone_config(
        [int(n) for n in FLAGS.meta_test_layer_sizes], hidden_size=FLAGS.hidden_size,
        msg_size=FLAGS.msg_size, micro_ticks=FLAGS.micro_ticks,
        target_scale=FLAGS.target_scale, w_init_std=FLAGS.w_init_std,
        error_scale=FLAGS.error_scale)


def make_optimizer() -> optax.GradientTransformation:
    """Adam with optional clipping and cosine decay: the meta-training optimiser."""
    decay = FLAGS.lr_decay_steps or FLAGS.num_steps
    return gradient.make_optimizer(
        "adam", FLAGS.lr, clip_norm=FLAGS.clip_norm if FLAGS.clip_norm > 0 else None,
        decay_steps=decay if FLAGS.lr_final_fraction != 1.0 else 0,
        final_lr_fraction=FLAGS.lr_final_fraction)


def build(cfg, spec):
    """(init_fn, step_fn, eval_fn) of the run; train state is a dict (see init_fn)."""
    opt = make_optimizer()
    use_enc = FLAGS.learned_encoding

    def init_fn():
        k_params, k_chains, k_run = jax.random.split(jax.random.PRNGKey(FLAGS.seed), 3)
        params = init_params(k_params, cfg)
        if FLAGS.init_checkpoint:
            params, info = checkpointing.load_learner(FLAGS.init_checkpoint, params)
            params = params.replace(cfg=cfg)
        encoding = cloning.init_encoding(cfg)
        if FLAGS.init_checkpoint:
            _, info = checkpointing.load_learner(FLAGS.init_checkpoint)
            encoding = cloning.encoding_from_info(info) or encoding
        chains = cloning.init_chains(k_chains, cfg, spec, FLAGS.batch_size)
        train = {"params": params, "encoding": encoding}
        return {"train": train, "opt_state": opt.init(train), "chains": chains,
                "key": k_run, "step": jnp.zeros((), jnp.int32)}

    def loss_fn(train, chains, key):
        # The restarts are drawn inside the loss so that the encoding of the
        # fresh states gets its gradient.
        enc = train["encoding"] if use_enc else None
        start, batch, advanced, reset = cloning.chain_batch(
            key, cfg, spec, chains, FLAGS.reset_prob, FLAGS.max_drift, FLAGS.stage, enc)
        loss, (metrics, final) = cloning.clone_loss(train["params"], spec, batch,
                                                    FLAGS.stage, enc, start)
        metrics["chain_abs_w"] = jnp.mean(jnp.abs(batch.w0))
        metrics["chain_restarts"] = jnp.mean(reset.astype(jnp.float32))
        return loss, (metrics, advanced.replace(state=final))

    @jax.jit
    def step_fn(state):
        key, k_step = jax.random.split(state["key"])
        train = state["train"]
        (_, (metrics, chains)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            train, state["chains"], k_step)
        updates, opt_state = opt.update(grads, state["opt_state"], train)
        new = {"train": optax.apply_updates(train, updates), "opt_state": opt_state,
               "chains": jax.lax.stop_gradient(chains), "key": key,
               "step": state["step"] + 1}
        return new, metrics

    eval_key = jax.random.PRNGKey(FLAGS.seed + 12345)  # fixed: evals are comparable
    eval_batch = cloning.sample_batch(eval_key, spec, FLAGS.eval_cells)

    @jax.jit
    def eval_fn(state):
        train = state["train"]
        enc = train["encoding"] if use_enc else None
        _, (metrics, _) = cloning.clone_loss(train["params"], spec, eval_batch,
                                             FLAGS.stage, enc)
        out = {"eval": metrics}
        if FLAGS.stage == "backprop" and FLAGS.eval_long_steps > 0:
            out["eval_long"] = cloning.long_run_errors(
                train["params"], spec, jax.random.fold_in(eval_key, 1),
                FLAGS.eval_cells, FLAGS.eval_long_steps, enc)
        return out

    return init_fn, step_fn, eval_fn


def write_learner(workdir: str, params, encoding, spec: cloning.CloneSpec,
                  seconds: float) -> None:
    """workdir/params.msgpack + workdir/learner.json (the portable learner).

    Re-running a finished run's command only rewrites these two files.
    """
    records = loop.read_metrics(workdir)
    train = [r for r in records if r["split"] == "train"]
    last = train[-100:]
    evals = {}
    for r in records:
        if r["split"].startswith("eval"):
            evals[r["split"]] = r
    extra = {
        "flags": run_config(),
        "clone": dataclasses.asdict(spec),
        "cloning": {
            "stage": FLAGS.stage,
            "steps": train[-1]["step"] if train else 0,
            "final_loss": float(np.mean([r["loss"] for r in last])) if last else None,
            "final_loss_window": len(last),
            "seconds_this_session": round(seconds, 1),
            "conventions": "w/s in c[0], b/s in c[1]; x on forward slot 0, y/s on "
                           "forward slot 0 (readout_scale=s), e and e' on backward slot 0; "
                           "protocol predict_then_learn, reduce sum.",
        },
        "final_eval": evals,
        # Training-only: how to write a given (w, b) into a cell (figure 4, tests).
        "clone_encoding": cloning.encoding_to_dict(encoding),
    }
    checkpointing.save_learner_dir(workdir, params,
                                   checkpointing.vsml_config_to_dict(params.cfg), extra)
    logging.info("Wrote %s/params.msgpack and %s/learner.json", workdir, workdir)


def main(argv):
    del argv
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required (the run's folder).")
    spec, cfg = make_spec(), make_config()
    init_fn, step_fn, eval_fn = build(cfg, spec)
    logging.info("Cloning (%s stage) in %s", FLAGS.stage, FLAGS.workdir)
    t0 = time.time()
    state = loop.run(FLAGS.workdir, init_fn, step_fn, FLAGS.num_steps,
                     config_dict=run_config(), checkpoint_every=FLAGS.checkpoint_every,
                     log_every=FLAGS.log_every, eval_fn=eval_fn,
                     eval_every=FLAGS.eval_every, safe_to_change=SAFE_TO_CHANGE)
    train = state["train"]
    write_learner(FLAGS.workdir, train["params"],
                  train["encoding"] if FLAGS.learned_encoding else None, spec,
                  time.time() - t0)


if __name__ == "__main__":
    app.run(main)
