"""A generic, resumable training loop for meta-training of any kind.

The loop knows nothing about learners, gradients or evolution. It drives two
caller-supplied functions:

    init_fn() -> train_state
        A pytree of arrays holding everything the run depends on: params,
        optimiser or strategy state, the PRNG key (and, if useful, a step
        counter). Static metadata (e.g. a VSMLConfig inside the params) is fine.
    step_fn(train_state) -> (train_state, metrics)
        One training step, usually jitted by the caller. `metrics` is a dict of
        scalars; `metrics[loss_key]` is the training loss. All randomness must
        come from the key inside train_state (data included: sample it from
        that key in the step), so the run is a pure function of init_fn.

and takes care of everything around them, all kept in `workdir`:

    config.json     the resolved run configuration. On resume it must match the
                    new configuration except for keys listed as safe to change
                    (e.g. num_steps); otherwise the loop refuses to continue.
    checkpoints/    orbax checkpoints of the whole train state (atomic saves,
                    the newest `max_to_keep` kept). The newest one is restored
                    on start, so re-running the same command resumes the run.
    metrics.jsonl   one JSON object per line: {"step", "split", **metrics};
                    split "train" every step, eval splits every eval_every
                    steps. On resume, lines after the restored step are dropped,
                    so the file equals that of an uninterrupted run.

Because the state carries the key and checkpoints hold the whole state, a run
stopped at any point and resumed gives bit-identical params and metrics.

A non-finite loss (or a non-finite train state about to be checkpointed)
stops the run with `FloatingPointError`; the bad state is never written, so the
last checkpoint stays good.

Example:
    final_state = run("/tmp/run", init_fn, step_fn, num_steps=1000,
                      config_dict=vars_of_flags, checkpoint_every=100,
                      log_every=10)
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vsml_jax.training import checkpointing

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"

# Keys that only change how long or how verbosely a run goes, not its numbers.
DEFAULT_SAFE_TO_CHANGE = ("num_steps", "checkpoint_every", "log_every", "eval_every",
                          "workdir", "data_dir", "max_to_keep")

Metrics = Dict[str, float]
EvalFn = Callable[[Any], Mapping[str, Mapping[str, float]]]


class ConfigMismatchError(ValueError):
    """The workdir holds a run made with a different configuration."""


# ------------------------------------------------------------------- config
def _normalise(config: Mapping[str, Any]) -> Dict[str, Any]:
    """JSON round trip, so tuples/lists and numpy scalars compare as stored."""
    return json.loads(json.dumps(dict(config), sort_keys=True, default=str))


def check_and_write_config(workdir: str, config_dict: Mapping[str, Any],
                           safe_to_change: Iterable[str], has_checkpoint: bool) -> None:
    """Writes workdir/config.json, refusing a resume under a different config.

    Raises:
      ConfigMismatchError naming every differing key (old -> new) when a
      checkpoint exists and a key outside `safe_to_change` differs.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    new = _normalise(config_dict)
    if has_checkpoint and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        safe = set(safe_to_change)
        diff = sorted(k for k in set(old) | set(new)
                      if k not in safe and old.get(k, "<missing>") != new.get(k, "<missing>"))
        if diff:
            lines = "; ".join(f"{k}: {old.get(k, '<missing>')!r} -> "
                              f"{new.get(k, '<missing>')!r}" for k in diff)
            raise ConfigMismatchError(
                f"{workdir} holds a checkpoint of a run with a different configuration "
                f"({lines}). Resume with the original settings, or use a new --workdir "
                f"for the new configuration. Keys that may change on resume: "
                f"{sorted(safe)}.")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(new, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------ metrics
def read_metrics(workdir: str) -> list:
    """All records of workdir/metrics.jsonl as a list of dicts (empty if none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(workdir: str, last_step: int) -> None:
    """Drops records written after `last_step` (they belong to lost progress)."""
    records = [r for r in read_metrics(workdir) if r["step"] <= last_step]
    path = os.path.join(workdir, METRICS_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _to_floats(metrics: Mapping[str, Any]) -> Metrics:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


def strong_types(tree: Any) -> Any:
    """Drops JAX "weak" dtypes (from Python scalars) from the leaves of `tree`.

    Works inside and outside jit. A jitted step whose input and output states
    differ in weak-typedness (e.g. `best_fitness=jnp.inf` at init) compiles
    twice; checkpoints restore strong types, so apply this to initial states
    and step outputs alike and fresh and resumed runs share one compiled step.
    """
    def fix(x):
        if isinstance(x, jax.core.Tracer):
            return jax.lax.convert_element_type(x, x.dtype)
        if isinstance(x, (float, int)) and not isinstance(x, bool):
            return jnp.asarray(np.asarray(x))
        if isinstance(x, jax.Array) and x.weak_type:
            # Through numpy: a host round trip instead of compiling a cast.
            return jnp.asarray(np.asarray(x), dtype=x.dtype)
        return x
    return jax.tree_util.tree_map(fix, tree)


def _all_finite(tree: Any) -> bool:
    """Checked on the host with numpy (no per-shape compilation)."""
    for x in jax.tree_util.tree_leaves(jax.device_get(tree)):
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
            return False
    return True


# --------------------------------------------------------------------- run
def run(workdir: str, init_fn: Callable[[], Any],
        step_fn: Callable[[Any], Tuple[Any, Mapping[str, Any]]], num_steps: int, *,
        config_dict: Mapping[str, Any], checkpoint_every: int, log_every: int = 10,
        eval_fn: Optional[EvalFn] = None, eval_every: int = 0, loss_key: str = "loss",
        safe_to_change: Iterable[str] = DEFAULT_SAFE_TO_CHANGE,
        max_to_keep: int = 3) -> Any:
    """Runs (or resumes) training in `workdir` up to `num_steps` steps.

    Args:
      workdir: folder for config.json, checkpoints/ and metrics.jsonl.
      init_fn: () -> train state (pytree); also the restore target's structure.
      step_fn: train state -> (train state, dict of scalar metrics).
      num_steps: total steps of the run (not steps still to do).
      config_dict: the run's resolved configuration (JSON-serialisable).
      checkpoint_every: save every this many steps (and always at the end).
      log_every: log progress every this many steps.
      eval_fn: train state -> {split: {name: scalar}}; each split becomes a
        metrics.jsonl record with that "split".
      eval_every: call eval_fn every this many steps and at the end (0: never).
      loss_key: the metric checked for NaN/inf and shown in the log.
      safe_to_change: config keys allowed to differ on resume.
      max_to_keep: number of checkpoints kept.
    Returns:
      the final train state.
    Raises:
      ConfigMismatchError: workdir holds a checkpoint from another config.
      FloatingPointError: the loss or the state became NaN/inf.
    """
    if num_steps < 0 or checkpoint_every < 1 or log_every < 1 or eval_every < 0:
        raise ValueError(f"run: need num_steps >= 0, checkpoint_every >= 1, "
                         f"log_every >= 1, eval_every >= 0; got {num_steps}, "
                         f"{checkpoint_every}, {log_every}, {eval_every}.")
    os.makedirs(workdir, exist_ok=True)
    manager = checkpointing.make_manager(os.path.join(workdir, CHECKPOINT_DIR),
                                         max_to_keep=max_to_keep)
    start = checkpointing.latest_step(manager)
    check_and_write_config(workdir, config_dict, safe_to_change, start is not None)

    state = strong_types(init_fn())
    if start is not None:
        logging.info("Restoring checkpoint of step %d from %s.", start, workdir)
        state = checkpointing.restore(manager, start, state)
    start = start or 0
    last_saved = start if start else None
    _truncate_metrics(workdir, start)
    if start >= num_steps:
        logging.info("Run in %s already has %d >= num_steps=%d steps.", workdir, start,
                     num_steps)
        checkpointing.close(manager)
        return state

    def save(step, state):
        if not _all_finite(state):
            raise FloatingPointError(
                f"the train state at step {step} contains NaN/inf and was not saved; "
                f"{_last_good(last_saved, workdir)}")
        checkpointing.save(manager, step, state)

    metrics_path = os.path.join(workdir, METRICS_FILE)
    t_start, window = time.time(), []
    with open(metrics_path, "a") as out:
        def write(step, split, values):
            out.write(json.dumps({"step": step, "split": split, **values},
                                 sort_keys=True) + "\n")

        def evaluate(step, state):
            for split, values in eval_fn(state).items():
                values = _to_floats(values)
                write(step, split, values)
                logging.info("step %d eval %s: %s", step, split,
                             ", ".join(f"{k}={v:.4f}" for k, v in sorted(values.items())))
            out.flush()

        for step in range(start + 1, num_steps + 1):
            new_state, metrics = step_fn(state)
            metrics = _to_floats(metrics)
            loss = metrics.get(loss_key, float("nan"))
            if not math.isfinite(loss):
                out.flush()
                raise FloatingPointError(
                    f"{loss_key} is {loss} at step {step}; training stopped and this "
                    f"state was not saved. {_last_good(last_saved, workdir)}")
            state = new_state
            write(step, "train", metrics)
            window.append(loss)
            if step % log_every == 0 or step == num_steps:
                elapsed = time.time() - t_start
                rate = (step - start) / max(elapsed, 1e-9)
                logging.info("step %d/%d %s %.4f (mean of last %d) | %.2f steps/s | "
                             "ETA %s", step, num_steps, loss_key, float(np.mean(window)),
                             len(window), rate, _eta((num_steps - step) / max(rate, 1e-9)))
                window = []
                out.flush()
            if eval_fn is not None and eval_every and (
                    step % eval_every == 0 or step == num_steps):
                evaluate(step, state)
            if step % checkpoint_every == 0 or step == num_steps:
                out.flush()
                save(step, state)
                last_saved = step
    checkpointing.close(manager)
    return state


def _last_good(last_saved: Optional[int], workdir: str) -> str:
    if last_saved is None:
        return (f"No checkpoint was written yet in {workdir}; lower the learning rate "
                "(or sigma) or enable gradient clipping and start again.")
    return (f"The last good checkpoint (step {last_saved}) is intact in {workdir}; "
            "re-running resumes from it (lower the learning rate or enable clipping "
            "first if the divergence repeats).")


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
