"""What the run functions of `vsml_jax.runs` share: checks of settings, data
loading, the command to re-run, and the portable learner written by process 0."""
from __future__ import annotations

import hashlib
import os
import shlex
import sys
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple


class SettingsError(ValueError):
    """A run's settings do not fit its data, devices or init checkpoint."""


class RunOutcome(NamedTuple):
    """What a run function returns.

    Attributes:
      params: the learner's meta variables at the end (host numpy pytree).
      step: the last step done (and checkpointed).
      preempted: SIGTERM stopped the run at `step`; re-running resumes it.
    """
    params: Any
    step: int
    preempted: bool


# A range: (low, high) inclusive, either None for unbounded, and optionally a
# third entry "> 0" for an exclusive lower bound of 0.
Range = Tuple


def check_ranges(cfg: Any, ranges: Mapping[str, Range]) -> None:
    """ValueError naming the first field of `cfg` outside its range (None = not set).

    Non-finite floats are always refused.
    """
    for name, rule in ranges.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        low, high = rule[0], rule[1]
        positive = len(rule) > 2
        bad = value != value or value in (float("inf"), float("-inf"))
        bad = bad or (low is not None and value < low) or (high is not None and value > high)
        bad = bad or (positive and value <= 0)
        if bad:
            if positive:
                want = "a positive number"
            elif low is not None and high is not None:
                want = f"in [{low}, {high}]"
            elif low is not None:
                want = f">= {low}"
            elif high is not None:
                want = f"<= {high}"
            else:
                want = "a finite number"
            raise ValueError(f"--{name}={value} must be {want}.")


def check_choices(cfg: Any, choices: Mapping[str, Sequence]) -> None:
    """ValueError naming a field of `cfg` whose value is not among its choices."""
    for name, allowed in choices.items():
        value = getattr(cfg, name)
        if value is not None and value not in allowed:
            raise ValueError(f"--{name}={value!r}: use one of "
                             f"{', '.join(map(str, allowed))}.")


def load_checked_dataset(spec: str, split: str, data_dir: Optional[str], pool: int,
                         download: bool, input_size: Optional[int] = None,
                         num_classes: Optional[int] = None):
    """`vsml_jax.data.make_dataset`, refusing a class count other than `num_classes`.

    The loaders themselves refuse non-finite pixels and labels outside
    0..C-1, naming the first bad example (`vsml_jax.data`).
    """
    from vsml_jax import data as vdata
    kwargs = {} if input_size is None else {"input_size": input_size}
    ds = vdata.make_dataset(spec, split, data_dir=data_dir, pool=pool, download=download,
                            **kwargs)
    if num_classes is not None and ds.num_classes != num_classes:
        raise ValueError(f"data set {spec} has {ds.num_classes} classes but the learner "
                         f"predicts {num_classes}; meta-test it with experiments.evaluate "
                         "(which builds a learner per data set) instead.")
    return ds


def where_it_runs() -> str:
    """"1 device of 1 process", "8 devices of 2 processes", ... (for the start line)."""
    import jax
    d, p = jax.device_count(), jax.process_count()
    return f"{d} device{'s' * (d != 1)} of {p} process{'es' * (p != 1)}"


def rerun_command(changes: Mapping[str, Any]) -> str:
    """This process's command line with `--name=value` flags set to `changes`.

    For messages that tell the user what to run next (e.g. after a NaN stop);
    flags given as `--name value` (two words) are left as they are.
    """
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
    out = [a for a in argv
           if not any(a == f"--{k}" or a.startswith(f"--{k}=") for k in changes)]
    out += [f"--{k}={v}" for k, v in changes.items()]
    out[0] = "python" if "python" in out[0] else out[0]
    return " ".join(shlex.quote(a) for a in out)


def recent_evals(records: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The last record of each "eval..." split of metrics.jsonl, by split name."""
    evals = {}
    for r in records:
        if r["split"].startswith("eval"):
            name = r["split"][5:] if r["split"].startswith("eval/") else r["split"]
            evals[name] = r
    return evals


def write_portable(workdir: str, learner, params, run_config: Dict[str, Any],
                   extra: Dict[str, Any]) -> None:
    """workdir/params.msgpack + learner.json (atomic; call on process 0 only).

    `params` may be global arrays (replicated): they are fetched to the host.
    """
    from vsml_jax import pretrained
    from vsml_jax.runtime import to_host
    pretrained.save_learner(workdir, learner, to_host(params), run_config, extra)


def data_fingerprint(dataset) -> Dict[str, Any]:
    """What identifies a training Dataset: where it came from, its counts, a hash.

    Stored in every checkpoint so that a resume on replaced data is noticed:
    {"name", "source", "num_examples", "num_classes", "input_dim", "sha256"}
    (SHA-256 of all labels and of at most ~1000 evenly spaced image rows:
    cheap even for MNIST, and any re-labelling or new file changes it) and,
    for a data file, "file_size".
    """
    import numpy as np
    images, labels = np.asarray(dataset.images), np.asarray(dataset.labels)
    h = hashlib.sha256(np.ascontiguousarray(labels).tobytes())
    h.update(np.ascontiguousarray(images[::max(1, images.shape[0] // 1000)]).tobytes())
    out = {"name": dataset.name, "source": dataset.source,
           "num_examples": int(images.shape[0]), "num_classes": int(dataset.num_classes),
           "input_dim": int(images.shape[1]), "sha256": h.hexdigest()}
    if dataset.source and os.path.isfile(dataset.source):
        out["file_size"] = os.path.getsize(dataset.source)
    return out


# ------------------------------------------------------------ path flags
# Flags that name files or folders (of any entry point).
PATH_FLAGS = ("workdir", "out_dir", "data_dir", "checkpoint", "init_checkpoint",
              "improved_checkpoint")
# Flags whose data set specs may carry a path after "npz:" / "idx:".
SPEC_FLAGS = ("dataset", "datasets", "eval_datasets")


def expand_path(value: str) -> str:
    """`~` and $VARS expanded (what a shell would have done unquoted)."""
    return os.path.expandvars(os.path.expanduser(value))


def _expand_spec(spec: str) -> str:
    import re
    return re.sub(r"(npz:|idx:)([^,+]+)", lambda m: m.group(1) + expand_path(m.group(2)),
                  spec)


def expand_path_flags(flag_values) -> None:
    """Expands `~` and $VARS in every path flag given, refusing an empty one.

    Raises:
      ValueError: a path flag was given as an empty string (`--workdir=`).
    """
    for name in PATH_FLAGS + SPEC_FLAGS:
        if name not in flag_values:
            continue
        flag = flag_values[name]
        value = flag.value
        if name in PATH_FLAGS and isinstance(value, str):
            if value.strip() == "" and flag.present:
                raise ValueError(f"--{name}= is empty: give a path, e.g. --{name}=runs/x.")
            flag.value = expand_path(value) if not value.startswith("pretrained:") \
                else value
        elif name in SPEC_FLAGS and isinstance(value, str):
            flag.value = _expand_spec(value)
        elif name in SPEC_FLAGS and isinstance(value, list):
            flag.value = [_expand_spec(v) for v in value]


# What to do about an operating-system error on a path, by errno.
_OS_FIXES = {
    "EACCES": "make it writable (chmod/chown) or choose another path",
    "EPERM": "make it writable (chmod/chown) or choose another path",
    "EROFS": "the file system is read-only: choose a path on a writable one",
    "ENOSPC": "free disk space (or choose a path on another disk), then run the same "
              "command again: completed checkpoints are kept and the run resumes",
    "EDQUOT": "free space within your quota, then run the same command again",
    "EFBIG": "a file-size limit stopped the write (`ulimit -f`): raise it, then run "
             "the same command again",
    "ENOTDIR": "a part of the path is a file, not a folder: choose another path",
    "EISDIR": "the path is a folder where a file was expected: choose another path",
    "ELOOP": "the path holds a symbolic-link loop: fix the links or choose another path",
    "ENAMETOOLONG": "choose a shorter path",
}


def describe_os_error(error: OSError) -> Optional[str]:
    """One line naming the path, the cause (errno) and the fix, or None when the
    error is not one of the path/space/permission errors a user can fix."""
    import errno as errno_lib
    name = errno_lib.errorcode.get(error.errno or -1)
    if name not in _OS_FIXES:
        return None
    path = error.filename or "a file"
    if error.filename2:
        path = f"{path} -> {error.filename2}"
    return (f"cannot write or read {path}: {os.strerror(error.errno)} ({name}); "
            f"{_OS_FIXES[name]}.")


# ------------------------------------------------------------ output folders
class OutDirTakenError(SettingsError):
    """--out_dir already holds the results of an earlier run."""


def claim_out_dir(out_dir: str, result_file: str):
    """Locks `out_dir` for this run (like a workdir) and refuses one that holds results.

    Returns the held `WorkdirLock` (release it when the files are written).
    Call on the writing process only.

    Raises:
      WorkdirLockedError: another run writes into `out_dir` now.
      OutDirTakenError: `out_dir/result_file` exists (an earlier run's results
        are never overwritten silently).
      NotADirectoryError: `out_dir` (or a folder above it) is a file.
    """
    from vsml_jax.training.workdir import WorkdirLock
    lock = WorkdirLock(out_dir, flag="--out_dir").acquire()
    existing = os.path.join(lock.workdir, result_file)
    if os.path.exists(existing):
        lock.release()
        raise OutDirTakenError(
            f"--out_dir={out_dir} already holds {result_file} of an earlier run; choose "
            f"another --out_dir, or move {existing} away to replace it.")
    return lock
