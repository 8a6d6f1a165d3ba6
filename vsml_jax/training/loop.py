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

    .lock           held while the run is live (host, PID, start time); a
                    second run on the same workdir is refused.
    config.json     the resolved run configuration. On resume it must match the
                    new configuration except for keys listed as safe to change
                    (num_steps, optimiser settings, ...; changes are recorded);
                    otherwise the loop refuses to continue.
    checkpoints/    orbax checkpoints of the whole train state (atomic saves,
                    the first and the newest `max_to_keep` kept, each with
                    vsml_meta.json: config, data fingerprint, array SHA-256).
                    The newest one that
                    restores is restored on start (damaged ones are moved
                    aside), so re-running the same command resumes the run.
    metrics.jsonl   one JSON object per line: {"step", "split", **metrics};
                    split "train" every step, eval splits every eval_every
                    steps. On resume, lines after the restored step are dropped,
                    so the file equals that of an uninterrupted run. The same
                    scalars go to TensorBoard event files (`metrics.MetricsWriter`).

Because the state carries the key and checkpoints hold the whole state, a run
stopped at any point and resumed gives bit-identical params and metrics. On
SIGTERM (preemption) every process saves at the same step and `run` returns.

A non-finite loss (or a non-finite train state about to be checkpointed)
stops the run with `FloatingPointError`; the bad state is never written. The
message names the kept steps and the newest one whose parameters gave a
finite, not exploded meta-loss (a checkpoint can hold weights that already
blew up: its loss is the one of the next step), to resume from with
`restore_step` (newer steps are moved to `checkpoints_rolled_back/`, never
deleted; step 0 starts again from `init_fn`).

Every checkpoint carries the run's config and a fingerprint of its data
(`checkpoint_meta`, see `checkpointing.save`); a resume compares them, so a
deleted config.json or a replaced data file cannot pass silently
(`allow_data_change` accepts new data, recorded in config.json).

Example:
    result = run("/tmp/run", init_fn, step_fn, num_steps=1000,
                 config_dict=vars_of_flags, checkpoint_every=100, log_every=10)
    result.state, result.step, result.preempted
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vsml_jax import runtime
from vsml_jax.training import checkpointing
from vsml_jax.training import metrics as metrics_lib
from vsml_jax.training import workdir as workdir_lib
from vsml_jax.training.metrics import read_metrics  # noqa: F401  (part of this API)
# What a workdir's configuration must satisfy on resume (part of this API too).
from vsml_jax.training.run_config import (  # noqa: F401
    CONFIG_FILE, RESUME_CHANGES, ConfigMismatchError, DataChangedError, check_and_write_config,
    check_data, check_same_config, normalise)

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"

# Keys that may change on resume: how long or how verbosely a run goes, where
# its data is read, and (listed by the entry points) optimiser settings.
DEFAULT_SAFE_TO_CHANGE = ("num_steps", "checkpoint_every", "log_every", "eval_every",
                          "workdir", "data_dir", "download", "max_to_keep")

Metrics = Dict[str, float]
EvalFn = Callable[[Any], Mapping[str, Mapping[str, float]]]


# A checkpoint's meta-loss (the loss of the step after it) counts as exploded
# when it is this many times the median of the run's losses before it.
EXPLODED_FACTOR = 100.0


def _to_floats(metrics: Mapping[str, Any]) -> Metrics:
    return {k: float(np.asarray(v)) for k, v in runtime.to_host(dict(metrics)).items()}


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
    for x in jax.tree_util.tree_leaves(runtime.to_host(tree)):
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
            return False
    return True


# --------------------------------------------------------------------- run
@dataclasses.dataclass
class RunResult:
    """What `run` ended with.

    Attributes:
      state: the train state at `step` (replicated on the mesh if one was given).
      step: the last step done (and checkpointed).
      preempted: the run stopped early because of SIGTERM (checkpoint saved at
        `step`; re-running the same command resumes from it).
    """
    state: Any
    step: int
    preempted: bool = False


def run(workdir: str, init_fn: Callable[[], Any],
        step_fn: Callable[[Any], Tuple[Any, Mapping[str, Any]]], num_steps: int, *,
        config_dict: Mapping[str, Any], checkpoint_every: int, log_every: int = 10,
        eval_fn: Optional[EvalFn] = None, eval_every: int = 0, loss_key: str = "loss",
        safe_to_change: Iterable[str] = DEFAULT_SAFE_TO_CHANGE,
        max_to_keep: int = 3, mesh: Optional[jax.sharding.Mesh] = None,
        on_checkpoint: Optional[Callable[[Any, int], None]] = None,
        nan_advice: Any = "lower the learning rate (or sigma) or enable gradient "
                          "clipping, and run the same command again",
        restore_step: Optional[int] = None,
        checkpoint_meta: Optional[Mapping[str, Any]] = None,
        allow_data_change: bool = False,
        preflight: Optional[Callable[[], Any]] = None) -> RunResult:
    """Runs (or resumes) training in `workdir` up to `num_steps` steps.

    Every process of a multi-process job calls it with the same arguments:
    all take part in the orbax saves and restores and run the same steps;
    only process 0 (`runtime.is_primary()`) locks the workdir and writes
    config.json, metrics and whatever `on_checkpoint` writes.

    Args:
      workdir: folder for config.json, checkpoints/ and metrics (locked while
        the run is live: a second run on it is refused).
      init_fn: () -> train state (pytree); also the restore target's structure.
        With `mesh` it is run under jit with replicated outputs, so every
        process builds the same global state without comparing values.
      step_fn: train state -> (train state, dict of scalar metrics).
      num_steps: total steps of the run (not steps still to do).
      config_dict: the run's resolved configuration (JSON-serialisable).
      checkpoint_every: save every this many steps (and always at the end).
      log_every: log progress every this many steps.
      eval_fn: train state -> {split: {name: scalar}}; each split becomes a
        metrics record with that "split".
      eval_every: call eval_fn every this many steps and at the end (0: never).
      loss_key: the metric checked for NaN/inf and shown in the log.
      safe_to_change: config keys allowed to differ on resume (the change is
        logged and recorded in config.json).
      max_to_keep: number of newest checkpoints kept (the first one is kept too).
      mesh: the device mesh of the run; the state is kept replicated on it.
      on_checkpoint: (state, step) -> None, called on every process after every
        save (e.g. to write the portable learner of that step: computations on
        the state must run on all processes; write files only on process 0).
      nan_advice: what to do when the loss turns NaN/inf (in the error), e.g.
        the command to run, completing "To resume from it, ..."; or a
        function (step to restore, 0 = from scratch) -> such a text.
      restore_step: resume from this kept step (0: from `init_fn`); newer
        steps are moved to `checkpoints_rolled_back/`.
      checkpoint_meta: {"data": fingerprint of the training data, ...} stored
        (with config_dict and an array checksum) in every checkpoint.
      allow_data_change: resume even when checkpoint_meta["data"] differs from
        the checkpoint's (recorded in config.json).
      preflight: () -> anything, called on every process once the workdir is
        locked and before the state is built (e.g. a memory check that
        compiles the step): a second run on a live workdir is refused at once,
        not after minutes of compiling.
    Returns:
      RunResult (the final state, its step, whether SIGTERM stopped the run).
    Raises:
      ConfigMismatchError: workdir holds a checkpoint from another config.
      WorkdirLockedError: another live run holds the workdir.
      FloatingPointError: the loss or the state became NaN/inf.
    """
    if num_steps < 0 or checkpoint_every < 1 or log_every < 1 or eval_every < 0:
        raise ValueError(f"run: need num_steps >= 0, checkpoint_every >= 1, "
                         f"log_every >= 1, eval_every >= 0; got {num_steps}, "
                         f"{checkpoint_every}, {log_every}, {eval_every}.")
    check_same_config(config_dict)  # first: differing flags break collectives obscurely
    primary = runtime.is_primary()
    lock = workdir_lib.WorkdirLock(workdir) if primary else None
    if primary:
        workdir_lib.prepare_workdir(workdir)
        lock.acquire()
    runtime.sync("vsml_jax:workdir_ready")
    try:
        if preflight is not None:
            preflight()
        return _run_locked(workdir, init_fn, step_fn, num_steps, config_dict,
                           checkpoint_every, log_every, eval_fn, eval_every, loss_key,
                           safe_to_change, max_to_keep, mesh, on_checkpoint, nan_advice,
                           restore_step, checkpoint_meta, allow_data_change)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(workdir, init_fn, step_fn, num_steps, config_dict, checkpoint_every,
                log_every, eval_fn, eval_every, loss_key, safe_to_change, max_to_keep,
                mesh, on_checkpoint, nan_advice, restore_step, checkpoint_meta,
                allow_data_change) -> RunResult:
    primary = runtime.is_primary()
    if mesh is not None:
        init_fn = jax.jit(init_fn, out_shardings=jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec()))
    state = strong_types(init_fn())
    # Pruned by `checkpointing.prune` after each save: the first step stays.
    manager = checkpointing.make_manager(os.path.join(workdir, CHECKPOINT_DIR),
                                         max_to_keep=None)
    if restore_step is not None:
        _roll_back(manager, workdir, restore_step, primary)
    meta = {"config": normalise(config_dict), **dict(checkpoint_meta or {})}
    # Every process compares the stored config (read-only) before anything is
    # restored (a checkpoint of another architecture would not restore) and
    # before process 0 rewrites it, so all refuse a mismatch alike.
    latest = checkpointing.latest_step(manager)
    stored = checkpointing.read_meta(manager, latest) if latest is not None else None
    stored = stored or {}
    check_and_write_config(workdir, config_dict, safe_to_change, latest is not None,
                           write=False, checkpoint_config=stored.get("config"))
    data_change = check_data(workdir, stored.get("data"), meta.get("data"),
                             allow_data_change)
    start, restored = _restore(manager, workdir, state, primary)
    runtime.sync("vsml_jax:config_checked")
    if primary:
        check_and_write_config(
            workdir, config_dict, safe_to_change, start is not None, step=start,
            extra_history={"data_change": data_change} if data_change else None)
    if restored is not None:
        state = restored
    start = start or 0
    if primary:
        metrics_lib.truncate_metrics(workdir, start)
    if start >= num_steps:
        logging.info("Run in %s already has %d >= num_steps=%d steps.", workdir, start,
                     num_steps)
        checkpointing.close(manager)
        return RunResult(state, start)

    def stop_advice(bad_step, bad_loss):
        writer.flush()
        return _last_good(manager, workdir, nan_advice, bad_step, bad_loss)

    def save(step, state):
        if not _all_finite(state):
            raise FloatingPointError(
                f"the train state at step {step} contains NaN/inf and was not saved. "
                f"{stop_advice(step, float('nan'))}")
        checkpointing.save(manager, step, state, meta)
        checkpointing.prune(manager, max_to_keep)  # collective, like the save
        if on_checkpoint is not None:
            on_checkpoint(state, step)

    watch = runtime.PreemptionWatch()
    writer = metrics_lib.MetricsWriter(workdir, enabled=primary, resume_step=start)
    t_start, window = time.time(), []
    step = start
    try:
        def evaluate(step, state):
            for split, values in eval_fn(state).items():
                values = _to_floats(values)
                writer.write(step, split, values)
                logging.info("step %d eval %s: %s", step, split, _format(values))
            writer.flush()

        for step in range(start + 1, num_steps + 1):
            new_state, metrics = step_fn(state)
            metrics = _to_floats(metrics)
            loss = metrics.get(loss_key, float("nan"))
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"{loss_key} is {loss} at step {step}; training stopped and this "
                    f"state was not saved. {stop_advice(step, loss)}")
            state = new_state
            writer.write(step, "train", metrics)
            window.append(loss)
            if step % log_every == 0 or step == num_steps:
                elapsed = time.time() - t_start
                rate = (step - start) / max(elapsed, 1e-9)
                logging.info("step %d/%d %s %.4f (mean of last %d) | %.2f steps/s | "
                             "ETA %s", step, num_steps, loss_key, float(np.mean(window)),
                             len(window), rate, _eta((num_steps - step) / max(rate, 1e-9)))
                window = []
                writer.flush()
            if eval_fn is not None and eval_every and (
                    step % eval_every == 0 or step == num_steps):
                evaluate(step, state)
            preempted = watch.reached(step)
            if step % checkpoint_every == 0 or step == num_steps or preempted:
                writer.flush()
                save(step, state)
            if preempted:
                logging.warning(
                    "Preempted (SIGTERM): saved the checkpoint of step %d in %s and "
                    "stopped; re-run the same command to resume.", step, workdir)
                return RunResult(state, step, preempted=True)
    finally:
        writer.close()
        watch.close()
        checkpointing.close(manager)
    return RunResult(state, step)


def _restore(manager, workdir: str, target: Any, primary: bool):
    """(step, restored state) of the newest checkpoint that restores, or (None, None).

    Damaged newer checkpoints are moved aside (by process 0) with a warning.
    """
    # It warns about (and moves aside) each damaged step it skips; when no
    # step restores at all it raises CheckpointRestoreError rather than
    # silently starting over.
    step, state, _ = checkpointing.restore_latest_good(manager, target, is_primary=primary)
    if step is not None:
        logging.info("Restored the checkpoint of step %d from %s.", step, workdir)
    return step, state


def _format(values: Mapping[str, float]) -> str:
    """name=value pairs, numbers in names ordered by value (acc@100 before acc@500)."""
    def order(name):
        prefix, _, number = name.partition("@")
        return (prefix, int(number) if number.isdigit() else -1, name)
    return ", ".join(f"{k}={values[k]:.4f}" for k in sorted(values, key=order))


def _roll_back(manager, workdir: str, restore_step: int, primary: bool) -> None:
    """Moves the checkpoints newer than `restore_step` to checkpoints_rolled_back/."""
    steps = checkpointing.all_steps(manager)
    if restore_step < 0 or (restore_step and restore_step not in steps):
        raise ConfigMismatchError(
            f"--restore_step={restore_step}: {workdir} keeps the checkpoints of steps "
            f"{steps or 'none'}; give one of them, or 0 to start again from scratch.")
    newer = [s for s in steps if s > restore_step]
    if primary:
        for s in newer:
            logging.warning("--restore_step=%d: moved the checkpoint of step %d to %s.",
                            restore_step, s, checkpointing.move_aside(
                                manager, s, checkpointing.ROLLED_BACK_SUFFIX))
    runtime.sync("vsml_jax:rolled_back")
    with checkpointing._quiet():
        manager.reload()


def good_steps(steps, losses: Mapping[int, float], bad_step: int) -> list:
    """The kept `steps` whose parameters gave a finite, not exploded meta-loss.

    The parameters saved at step s are those the loss of step s + 1 was
    computed with; a step whose next loss is unknown, non-finite, at or after
    `bad_step`, or exploded does not pass. A loss is exploded when it is over
    EXPLODED_FACTOR times the median of the last 50 healthy (not exploded)
    losses before it, so a run of huge losses cannot raise its own bar.
    Newest first.
    """
    healthy, ok = [], {}
    for k in sorted(losses):
        v = losses[k]
        ok[k] = math.isfinite(v) and not (healthy and abs(v) > EXPLODED_FACTOR * max(
            abs(float(np.median(healthy[-50:]))), 1e-6))
        if ok[k]:
            healthy.append(v)
    return [s for s in sorted(steps, reverse=True) if s + 1 < bad_step and ok.get(s + 1)]


def _last_good(manager, workdir: str, advice: Any, bad_step: int, bad_loss: float) -> str:
    """The part of a NaN stop's message that says which state to go back to, and how."""
    steps = checkpointing.all_steps(manager)
    losses = {r["step"]: r.get("loss", float("nan"))
              for r in read_metrics(workdir) if r.get("split") == "train"}
    good = good_steps(steps, losses, bad_step)
    target = good[0] if good else 0
    text = advice(target) if callable(advice) else advice
    kept = (f"Kept checkpoints in {workdir}: steps {steps}." if steps else
            f"No checkpoint was written in {workdir}.")
    if not good:
        why = (" None of them gave a finite, not exploded meta-loss." if steps else "")
        return f"{kept}{why} To start again from step 0, {text}."
    return (f"{kept} The newest whose parameters gave a finite, not exploded meta-loss "
            f"is step {target}. To resume from it, {text}. "
            f"`python -m experiments.evaluate --checkpoint={workdir}` meta-tests the "
            f"newest learner written.")


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
