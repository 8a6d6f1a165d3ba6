"""A run's configuration in its workdir: written once, compared on every resume.

- `check_and_write_config`: config.json, refusing a resume under another
  configuration (keys listed as safe to change may differ; each change is
  recorded in config.json's "resume_changes").
- `check_data`: the training data's fingerprint stored in a checkpoint against
  the current one (`DataChangedError`, or recorded with allow_change).
- `check_same_config`: every process of a multi-process job was given the same
  settings (one all-gather of per-key hashes at start-up).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Mapping, Optional

import jax
import numpy as np
from absl import logging

CONFIG_FILE = "config.json"
RESUME_CHANGES = "resume_changes"


class ConfigMismatchError(ValueError):
    """The workdir holds a run made with a different configuration."""


class DataChangedError(ConfigMismatchError):
    """The training data differ from those the checkpoint was trained on."""


def normalise(config: Mapping[str, Any]) -> Dict[str, Any]:
    """JSON round trip, so tuples/lists and numpy scalars compare as stored."""
    return json.loads(json.dumps(dict(config), sort_keys=True, default=str))


def check_and_write_config(workdir: str, config_dict: Mapping[str, Any],
                           safe_to_change: Iterable[str], has_checkpoint: bool, *,
                           write: bool = True, step: Optional[int] = None,
                           checkpoint_config: Optional[Mapping[str, Any]] = None,
                           extra_history: Optional[Dict[str, Any]] = None) -> None:
    """Writes workdir/config.json, refusing a resume under a different config.

    Keys in `safe_to_change` (optimiser settings, cadences, num_steps) may
    differ on resume: each change is logged and appended to the
    "resume_changes" list of config.json ({"step", "changes": {key: [old,
    new]}}), which is kept across resumes.

    Args:
      write: False only checks (what every process of a multi-process job does
        before process 0 writes).
      step: the step resumed from (recorded with the changes).
      checkpoint_config: the config stored inside the checkpoint resumed from;
        compared too (and used alone when config.json is missing).
      extra_history: more to record with this resume (e.g. an accepted data
        change), appended to "resume_changes".
    Raises:
      ConfigMismatchError naming every differing key (old -> new) when a
      checkpoint exists and a key outside `safe_to_change` differs.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    new = normalise(config_dict)
    history = []
    if has_checkpoint and checkpoint_config is not None:
        # The checkpoint's own config first: config.json may be gone or edited.
        _diff_or_raise(workdir, normalise(checkpoint_config), new, safe_to_change,
                       "the checkpoint's own record")
    if has_checkpoint and os.path.exists(path):
        old = _read_config(path)
        history = old.pop(RESUME_CHANGES, [])
        _diff_or_raise(workdir, old, new, safe_to_change, "config.json")
        keys = sorted(set(old) | set(new))
        changes = {k: [old.get(k), new.get(k)] for k in keys
                   if old.get(k, "<missing>") != new.get(k, "<missing>")}
        if changes and write:
            logging.info("Resuming %s at step %s with changed settings: %s", workdir, step,
                         "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
            history = history + [{"step": step, "changes": changes}]
    if extra_history and write:
        history = history + [dict(step=step, **extra_history)]
    if not write:
        return
    if history:
        new[RESUME_CHANGES] = history
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(new, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _read_config(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            old = json.load(f)
    except ValueError as e:
        raise ConfigMismatchError(
            f"{path} is not valid JSON ({e}); the checkpoints keep their own copy of the "
            f"config: delete {path} and run the same command again to resume.") from None
    if not isinstance(old, dict):
        raise ConfigMismatchError(f"{path} does not hold a JSON object; delete it and "
                                  "run the same command again to resume.")
    return old


def _diff_or_raise(workdir: str, old: Dict[str, Any], new: Dict[str, Any],
                   safe_to_change: Iterable[str], where: str) -> None:
    old = {k: v for k, v in old.items() if k != RESUME_CHANGES}
    safe = set(safe_to_change)
    keys = sorted(set(old) | set(new))
    diff = [k for k in keys if k not in safe
            and old.get(k, "<missing>") != new.get(k, "<missing>")]
    if diff:
        lines = "; ".join(f"{k}: {old.get(k, '<missing>')!r} -> "
                          f"{new.get(k, '<missing>')!r}" for k in diff)
        raise ConfigMismatchError(
            f"{workdir} holds a checkpoint of a run with a different configuration "
            f"({where}: {lines}). Resume with the original settings, or use a new "
            f"--workdir for the new configuration. Keys that may change on resume: "
            f"{sorted(safe)}.")


def check_data(workdir: str, stored: Optional[Mapping[str, Any]],
               current: Optional[Mapping[str, Any]], allow_change: bool
               ) -> Optional[Dict[str, Any]]:
    """Compares the data fingerprint stored in a checkpoint with the current one.

    Returns None when they agree (or either is unknown), else the changes
    {key: [old, new]} when `allow_change`.
    Raises:
      DataChangedError naming what changed, unless `allow_change`.
    """
    if not stored or not current:
        return None
    stored, current = normalise(stored), normalise(current)
    keys = sorted(set(stored) | set(current))
    changes = {k: [stored.get(k), current.get(k)] for k in keys
               if stored.get(k) != current.get(k)}
    # Where the data lie may change (--data_dir is safe to change): only
    # what they hold counts, the place is named when that differs.
    if set(changes) <= {"source"}:
        return None
    lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
    if not allow_change:
        raise DataChangedError(
            f"the training data differ from those the checkpoint in {workdir} was "
            f"trained on ({lines}). Restore the original data, use a new --workdir, or "
            "add --allow_data_change to continue on the new data (recorded in "
            "config.json).")
    logging.warning("Continuing %s on changed training data (--allow_data_change): %s",
                    workdir, lines)
    return changes


def check_same_config(config_dict: Mapping[str, Any]) -> None:
    """Refuses a multi-process job whose processes were given different settings.

    Every process hashes each config entry; the hashes are gathered and the
    entries that differ are named (without this, the first collective of
    differently shaped programs fails as an anonymous "collective mismatch").
    """
    if jax.process_count() == 1:
        return
    import hashlib
    from jax.experimental import multihost_utils
    config = normalise(config_dict)
    keys = sorted(config)
    digest = lambda item: int(hashlib.sha256(json.dumps(item, sort_keys=True).encode())
                              .hexdigest()[:7], 16)
    counts = multihost_utils.process_allgather(np.asarray([len(keys), digest(keys)],
                                                          np.int32))
    if not np.all(counts == counts[0]):
        raise ConfigMismatchError(
            "the processes of this job run different versions of the code (their "
            "settings have different names); start every process from the same checkout.")
    hashes = multihost_utils.process_allgather(
        np.asarray([digest([k, config[k]]) for k in keys], np.int32))
    differ = [k for i, k in enumerate(keys) if not np.all(hashes[:, i] == hashes[0, i])]
    if differ:
        mine = "; ".join(f"--{k}={config[k]!r}" for k in differ)
        raise ConfigMismatchError(
            f"the processes of this job were started with different settings: "
            f"{', '.join(differ)} (process {jax.process_index()} has {mine}). Start "
            "every process with the same flags.")
