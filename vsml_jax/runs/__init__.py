"""Whole runs as library calls, the way the entry points run them.

`meta_train.train_and_evaluate(MetaTrainConfig(...), workdir)` and
`clone.train_and_evaluate(CloneConfig(...), workdir)` do everything a run
does: one mesh over all devices of all processes, the training loop with
checkpoints, metrics and preemption, and the portable learner at the end.
Call `vsml_jax.runtime.start()` first. `experiments/` only parses flags into
these configs.
"""
