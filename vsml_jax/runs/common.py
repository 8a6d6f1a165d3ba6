"""What the run functions of `vsml_jax.runs` share: checks of settings, data
loading, the command to re-run, and the portable learner written by process 0."""
from __future__ import annotations

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
