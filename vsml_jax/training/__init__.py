"""Training machinery shared by every meta-training entry point.

`loop.run(workdir, init_fn, step_fn, num_steps, ...)` drives any jitted step
function with resumable orbax checkpoints, metrics.jsonl, evaluation and a
NaN guard; `checkpointing` holds the orbax helpers and the portable learner
files (params.msgpack + learner.json).
"""
from vsml_jax.training import checkpointing, loop
from vsml_jax.training.checkpointing import (load_learner, load_vsml_learner,
                                             save_learner, save_learner_dir)
from vsml_jax.training.loop import ConfigMismatchError, read_metrics, run

__all__ = ["checkpointing", "loop", "run", "read_metrics", "ConfigMismatchError",
           "save_learner", "save_learner_dir", "load_learner", "load_vsml_learner"]
