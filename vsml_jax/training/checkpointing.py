"""Checkpoints: orbax for training runs, msgpack + JSON for portable learners.

Training checkpoints hold the whole train state (params, optimiser or strategy
state, PRNG key, step) so that a resumed run continues exactly where it
stopped. They are written by an orbax `CheckpointManager` (atomic: a step
directory appears only once complete; old steps pruned to `max_to_keep`).

A *portable learner* is the small pair of files a user loads to run a
meta-trained learner without the training code's state, named either by a
prefix or (as written at the end of a meta-training run) by a folder:

    <prefix>.msgpack  or  <dir>/params.msgpack   flax.serialization.to_bytes(params)
    <prefix>.json     or  <dir>/learner.json     {"format", "learner", "config", ...extra}

For VS-ML, "config" holds the `VSMLConfig` fields, which is enough to rebuild
the params structure (see `load_vsml_learner`).

`restore_latest_good` resumes from the newest checkpoint that restores: a
damaged newer one (truncated data, missing files, an empty step folder) is
moved aside to `<checkpoints>_damaged/` and reported, never deleted.

Every training checkpoint written through `save(..., meta=...)` also holds
`<step folder>/vsml_meta.json`: the run's config, a fingerprint of its
training data and a SHA-256 of its arrays (`state_digest`). The digest is
checked at restore: a checkpoint whose arrays differ from what was saved
(a flipped bit) counts as damaged, like a truncated one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization

LEARNER_FORMAT = "vsml_jax.learner/1"


# ------------------------------------------------------------ train states
@contextlib.contextmanager
def _quiet():
    """Orbax logs every save in detail at INFO; keep the run's log readable."""
    level = logging.get_verbosity()  # absl: larger = more verbose (INFO 0, WARNING -1)
    logging.set_verbosity(min(level, logging.WARNING))
    try:
        yield
    finally:
        logging.set_verbosity(level)


def make_manager(directory: str, max_to_keep: Optional[int] = 3
                 ) -> ocp.CheckpointManager:
    """A synchronous orbax CheckpointManager over `directory` (created if missing).

    Saves are synchronous so that a checkpoint is complete on disk when `save`
    returns: a crash right after cannot leave a half-written latest step.
    `max_to_keep=None` keeps every step (the training loop prunes itself with
    `prune`, keeping the first step too).
    """
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    with _quiet():
        return ocp.CheckpointManager(os.path.abspath(directory), options=options)


META_FILE = "vsml_meta.json"


def state_digest(tree: Any) -> str:
    """SHA-256 over the leaves of `tree` (dtype, shape and bytes, in tree order).

    Every process must call it (a sharded leaf is gathered).
    """
    from vsml_jax.runtime import to_host
    h = hashlib.sha256()
    for x in jax.tree_util.tree_leaves(to_host(tree)):
        x = np.ascontiguousarray(np.asarray(x))
        h.update(f"{x.dtype.str}{x.shape}".encode())
        h.update(x.tobytes())
    return h.hexdigest()


def save(manager: ocp.CheckpointManager, step: int, tree: Any,
         meta: Optional[Dict[str, Any]] = None) -> None:
    """Saves pytree `tree` as checkpoint `step` (overwrites nothing: steps are unique).

    With `meta` (a JSON-ready dict, e.g. {"config", "data"}), process 0 also
    writes it with the arrays' `state_digest` to `<step folder>/vsml_meta.json`
    (every process must call this: the digest may gather).
    """
    with _quiet():
        manager.save(int(step), args=ocp.args.StandardSave(tree), force=True)
        manager.wait_until_finished()
    if meta is None:
        return
    record = dict(meta, digest=state_digest(tree), step=int(step))
    if jax.process_index() == 0:
        path = os.path.join(str(_step_path(manager, step)), META_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True, default=str)
        os.replace(tmp, path)


def read_meta(manager: ocp.CheckpointManager, step: int) -> Optional[Dict[str, Any]]:
    """The vsml_meta.json of checkpoint `step`, or None (older checkpoints, unreadable)."""
    try:
        with open(os.path.join(str(_step_path(manager, step)), META_FILE)) as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None


def prune(manager: ocp.CheckpointManager, keep_last: int) -> List[int]:
    """Deletes all steps but the first and the newest `keep_last`; returns the kept steps."""
    with _quiet():
        steps = sorted(manager.all_steps())
        keep = set(steps[:1]) | set(steps[-keep_last:] if keep_last > 0 else [])
        for step in steps:
            if step not in keep:
                manager.delete(step)
    return sorted(keep)


def all_steps(manager: ocp.CheckpointManager) -> List[int]:
    """The saved steps, oldest first."""
    with _quiet():
        manager.reload()
        return sorted(manager.all_steps())


def close(manager: ocp.CheckpointManager) -> None:
    """Closes `manager` (waits for pending work)."""
    with _quiet():
        manager.close()


def latest_step(manager: ocp.CheckpointManager) -> Optional[int]:
    """The newest saved step, or None if the directory holds no checkpoint."""
    with _quiet():
        return manager.latest_step()


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
    """Restores checkpoint `step` into the structure, shapes and dtypes of `target`.

    `target` is a pytree like the saved one (e.g. a freshly initialised train
    state); static metadata (such as a VSMLConfig inside the params) comes from
    it, the arrays from disk.
    """
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    with _quiet():
        return manager.restore(int(step), args=ocp.args.StandardRestore(abstract))


class CheckpointRestoreError(RuntimeError):
    """No checkpoint of a directory restores; nothing was moved or deleted.

    Attributes:
      failures: [(step, reason)], newest first.
    """

    def __init__(self, message: str, failures: List[Tuple[int, str]]):
        super().__init__(message)
        self.failures = failures


DAMAGED_SUFFIX = "_damaged"
ROLLED_BACK_SUFFIX = "_rolled_back"  # steps set aside by a resume with --restore_step


def _reason(error: BaseException) -> str:
    """A one-line description of a restore error (tensorstore's messages run to pages)."""
    text = " ".join(str(error).split())
    if len(text) > 300:
        text = text[:300] + " ..."
    return f"{type(error).__name__}: {text}"


def _step_path(manager: ocp.CheckpointManager, step: int):
    """The folder of `step` (an etils.epath.Path) under a `make_manager` manager."""
    try:
        return ocp.step.find_step_path(manager.directory, ocp.step.standard_name_format(),
                                       step=step)
    except (ValueError, FileNotFoundError):
        return manager.directory / str(step)


def _try_restore(directory: str, step: int, abstract: Any) -> Tuple[bool, Any]:
    """(True, state) if checkpoint `step` restores, else (False, reason).

    A throwaway manager per attempt: a CheckpointManager fixes its item layout
    from the first step it restores, so after trying an empty step folder it
    fails on every other step too ("Must provide `args` of type `Composite`").
    """
    manager = make_manager(directory, max_to_keep=None)
    try:
        with _quiet():
            state = manager.restore(int(step), args=ocp.args.StandardRestore(abstract))
        meta = read_meta(manager, step)
        if meta and meta.get("digest") and state_digest(state) != meta["digest"]:
            return False, (f"its arrays differ from what was saved (SHA-256 mismatch "
                           f"with {META_FILE}): the files are damaged")
        return True, state
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types
        return False, _reason(e)
    finally:
        close(manager)


def _agree(ok: bool) -> bool:
    """Whether `ok` holds on every process (all must restore the same step)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def move_aside(manager: ocp.CheckpointManager, step: int,
               suffix: str = DAMAGED_SUFFIX) -> str:
    """Moves the folder of checkpoint `step` to `<checkpoints>_damaged/<step>-<UTC time>`.

    Outside the manager's directory, so orbax neither lists nor prunes it.
    Returns the new path. Call on one process only.
    """
    src = _step_path(manager, step)
    damaged = src.parent.parent / (src.parent.name + suffix)
    damaged.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dst, n = damaged / f"{src.name}-{stamp}", 1
    while dst.exists():
        n += 1
        dst = damaged / f"{src.name}-{stamp}-{n}"
    src.rename(dst)
    return str(dst)


def restore_latest_good(manager: ocp.CheckpointManager, target: Any, *,
                        is_primary: Optional[bool] = None
                        ) -> Tuple[Optional[int], Any, List[Tuple[int, str]]]:
    """Restores the newest checkpoint that restores, moving damaged newer ones aside.

    Tries the steps of `manager` (a `make_manager` manager) newest first. A
    step that fails to restore (truncated data, missing files, an empty step
    folder, a tree that does not fit `target`, ...) gets a warning naming it
    and the reason. Once a step restores, the failed newer ones are moved to
    `<checkpoints>_damaged/` (by the primary process; see `move_aside`),
    never deleted, and `manager` is reloaded so that it saves on from there.

    If no step restores, nothing is moved and `CheckpointRestoreError` is
    raised: a failure of every step points at a cause outside the files (the
    train state's structure changed, a filesystem error), and starting from
    scratch would bury the run's progress under a new one.

    Multi-process jobs: every process calls this (orbax restores are
    collective); the processes agree on each step's outcome, only the primary
    one moves folders, and all wait for it before reloading the manager.

    Args:
      manager: the run's CheckpointManager (reloaded in place).
      target: a pytree like the saved one (as for `restore`).
      is_primary: whether this process moves damaged folders (default:
        jax.process_index() == 0).
    Returns:
      (step, state, skipped): the restored step and state, or (None, None, [])
      when there is no checkpoint; skipped lists (step, reason) of the newer
      steps that failed and were moved aside, newest first.
    Raises:
      CheckpointRestoreError: there are checkpoints but none restores.
    """
    if is_primary is None:
        is_primary = jax.process_index() == 0
    directory = str(manager.directory)
    with _quiet():
        manager.reload()
        steps = sorted(manager.all_steps(), reverse=True)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    failures: List[Tuple[int, str]] = []
    for step in steps:
        ok, result = _try_restore(directory, step, abstract)
        if _agree(ok):
            break
        reason = result if not ok else "another process could not restore it"
        logging.warning("The checkpoint of step %d in %s does not restore (%s)%s.", step,
                        directory, reason,
                        "; trying the next older one" if step != steps[-1] else "")
        failures.append((step, reason))
    else:
        if not steps:
            return None, None, []
        listing = "; ".join(f"step {s}: {r}" for s, r in failures)
        raise CheckpointRestoreError(
            f"None of the checkpoints in {directory} restores ({listing}). Nothing was "
            "moved or deleted. When every step fails alike, the cause is usually not "
            "the files: the train state's structure differs from the saved one (resume "
            "with the code and flags that wrote them), or the file system failed. To "
            f"start from scratch instead, use another --workdir or move {directory} "
            "away.", failures)
    if failures:
        if is_primary:
            for bad, _ in failures:
                logging.warning("Moved the damaged checkpoint of step %d to %s.", bad,
                                move_aside(manager, bad))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("vsml_jax:damaged_checkpoints_moved")
        with _quiet():
            manager.reload()
    return step, result, failures


# -------------------------------------------------------- portable learners
DIR_PARAMS, DIR_INFO = "params.msgpack", "learner.json"


def _paths(path: str) -> Tuple[str, str]:
    """(msgpack, json) paths of a learner given by folder or by prefix."""
    if os.path.isdir(path):
        return os.path.join(path, DIR_PARAMS), os.path.join(path, DIR_INFO)
    return path + ".msgpack", path + ".json"


def save_learner(path_prefix: str, params: Any, config_dict: Dict[str, Any],
                 extra: Optional[Dict[str, Any]] = None, learner: str = "vsml"
                 ) -> Tuple[str, str]:
    """Writes `<prefix>.msgpack` (params) and `<prefix>.json` (description).

    Args:
      path_prefix: e.g. "vsml_jax/pretrained/mnist" -> mnist.msgpack + mnist.json.
      params: the meta variables (any pytree of arrays).
      config_dict: JSON-serialisable static config (for VS-ML the VSMLConfig fields).
      extra: more JSON-serialisable fields (flags, meta-training steps, loss, ...).
      learner: the learner's name ("vsml", "meta_rnn").
    Returns:
      (msgpack path, json path).
    """
    return _write_pair(path_prefix + ".msgpack", path_prefix + ".json", params,
                       config_dict, extra, learner)


def save_learner_dir(directory: str, params: Any, config_dict: Dict[str, Any],
                     extra: Optional[Dict[str, Any]] = None, learner: str = "vsml"
                     ) -> Tuple[str, str]:
    """Like `save_learner`, as <directory>/params.msgpack + <directory>/learner.json."""
    os.makedirs(directory, exist_ok=True)
    return _write_pair(os.path.join(directory, DIR_PARAMS),
                       os.path.join(directory, DIR_INFO), params, config_dict, extra,
                       learner)


def _write_pair(msgpack_path, json_path, params, config_dict, extra, learner):
    os.makedirs(os.path.dirname(os.path.abspath(msgpack_path)), exist_ok=True)
    info = {"format": LEARNER_FORMAT, "learner": learner, "config": config_dict}
    info.update(extra or {})
    # Write to temporary names, then rename: readers never see a partial file.
    for path, payload, mode in ((msgpack_path, serialization.to_bytes(params), "wb"),
                                (json_path, json.dumps(info, indent=2, sort_keys=True)
                                 + "\n", "w")):
        tmp = path + ".tmp"
        with open(tmp, mode) as f:
            f.write(payload)
        os.replace(tmp, path)
    return msgpack_path, json_path


def load_learner(path_prefix: str, target: Any = None) -> Tuple[Any, Dict[str, Any]]:
    """Reads a portable learner.

    Args:
      path_prefix: as given to `save_learner`, or a folder holding
        params.msgpack + learner.json (`save_learner_dir`, a run's workdir).
      target: a params pytree of the right structure (e.g. from init_params);
        without it the raw nested dict of arrays is returned.
    Returns:
      (params, info dict from the JSON).
    """
    msgpack_path, json_path = _paths(path_prefix)
    for path in (msgpack_path, json_path):
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"portable learner file {path} is missing; a learner is either the "
                f"pair {path_prefix}.msgpack + {path_prefix}.json (save_learner) or a "
                f"folder with {DIR_PARAMS} + {DIR_INFO} (written by "
                "experiments.meta_train at the end of a run).")
    with open(json_path) as f:
        info = json.load(f)
    if info.get("format") != LEARNER_FORMAT:
        raise ValueError(f"{json_path} has format {info.get('format')!r}; expected "
                         f"{LEARNER_FORMAT!r}.")
    with open(msgpack_path, "rb") as f:
        payload = f.read()
    if target is None:
        return serialization.msgpack_restore(payload), info
    return serialization.from_bytes(target, payload), info


def vsml_config_to_dict(cfg) -> Dict[str, Any]:
    """The VSMLConfig fields as a JSON-friendly dict (tuples become lists)."""
    d = dataclasses.asdict(cfg)
    d["layer_sizes"] = list(d["layer_sizes"])
    return d


def load_vsml_learner(path_prefix: str):
    """Loads a VS-ML portable learner (prefix or folder): (params, VSMLConfig, info)."""
    from vsml_jax.config import VSMLConfig
    from vsml_jax.params import init_params

    _, info = load_learner(path_prefix)
    if info.get("learner") != "vsml":
        raise ValueError(f"{path_prefix}.json describes a {info.get('learner')!r} "
                         "learner, not 'vsml'.")
    cfg = VSMLConfig(**info["config"])
    target = init_params(jax.random.PRNGKey(0), cfg)
    params, _ = load_learner(path_prefix, target)
    return params, cfg, info
