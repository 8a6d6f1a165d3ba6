r"""Learning algorithm cloning (paper sec. 3.1, appendix B, table 1).

    python -m experiments.clone --stage=backprop \
        --flagfile=experiments/configs/clone_backprop_cpu.flags --workdir=runs/clone_bp

A thin flag parser over `vsml_jax.runs.clone.train_and_evaluate` (see there
for what is cloned and what the run writes). Runs on one device, all devices
of a machine, or as a multi-process job (BUILD.md); re-running with the same
--workdir resumes, SIGTERM saves and stops cleanly. At the end

    python -m experiments.evaluate --checkpoint=runs/clone_bp

meta-tests the cloned learning algorithm (no gradient computed anywhere).
"""
from __future__ import annotations

from absl import flags, logging

from experiments import common
from vsml_jax.runs.clone import STAGES, CloneConfig, train_and_evaluate

FLAGS = flags.FLAGS
D = CloneConfig()

common.define_workdir_flag()
common.define_cluster_flags()
flags.DEFINE_enum("stage", "backprop", list(STAGES),
                  "forward: clone y = tanh(x) w + b; backprop: also the updates and e'; "
                  "nearest_mean: the nearest class mean (see vsml_jax.cloning).")
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
flags.DEFINE_float("x_low", D.x_low, "nearest_mean: x ~ U(x_low, x_high), x_low also "
                   "the background value (standardised pixels).")
flags.DEFINE_float("x_high", D.x_high, "nearest_mean: upper end of the random x.")
flags.DEFINE_float("label_prob_max", D.label_prob_max, "nearest_mean: a cell's class "
                   "frequency ~ U(0, label_prob_max).")
flags.DEFINE_float("log_count_scale", D.log_count_scale, "nearest_mean: cells store "
                   "their class count n as q = n/(n+1) (0) or as log(n+1)/K (K > 0: the "
                   "step 1/(n+1) stays precise for counts in the hundreds).")
flags.DEFINE_float("count_max", D.count_max, "nearest_mean: 0: restarting training cells "
                   "start empty; > 0: half start holding a random mean and a count up to "
                   "count_max (trains long streams without unrolling them).")
flags.DEFINE_boolean("input_tanh", D.input_tanh, "nearest_mean: clone the nearest class "
                     "mean of tanh(x) instead of x.")
flags.DEFINE_float("logit_scale", D.logit_scale, "nearest_mean: logits = logit_scale * "
                   "mean_a (x_a m_ab - m_ab^2 / 2) in the saved learner.")
# Optimisation.
flags.DEFINE_integer("batch_size", 256, "K: cells per step (table 1: 32,768).")
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
flags.DEFINE_integer("eval_cells", 512, "Cells of the evaluations.")
flags.DEFINE_integer("eval_long_steps", 300, "Steps of the free-run evaluation.")
common.define_schedule_flags(num_steps=D.num_steps, checkpoint_every=D.checkpoint_every,
                             log_every=D.log_every, eval_every=D.eval_every)
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv
    outcome = train_and_evaluate(common.config_from_flags(CloneConfig), FLAGS.workdir)
    if outcome.preempted:
        logging.warning("Stopped by SIGTERM at step %d; the same command resumes.",
                        outcome.step)


if __name__ == "__main__":
    common.run(main)
