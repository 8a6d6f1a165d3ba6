"""Whole runs as library calls, the way the entry points run them.

`meta_train.train_and_evaluate(MetaTrainConfig(...), workdir)` and
`clone.train_and_evaluate(CloneConfig(...), workdir)` do everything a run
does: one mesh over all devices of all processes, the training loop with
checkpoints, metrics and preemption, and the portable learner at the end.
`evaluate.meta_test(EvaluateConfig(...), out_dir)` meta-tests learners and
baselines on identical streams (figure 6's tables and plots). Call
`vsml_jax.runtime.start()` first. `experiments/` only parses flags into these
configs.
"""
