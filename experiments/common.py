"""What every entry point shares: flag groups defined once, flags -> run
configs, and `run(main)`, which starts the process (multi-process join before
any JAX backend use) and turns user errors into one clear line.

An entry point defines its own flags, then:

    common.define_cluster_flags()
    ...
    def main(argv):
        cfg = common.config_from_flags(MetaTrainConfig, ...)
        train_and_evaluate(cfg, FLAGS.workdir)
    if __name__ == "__main__":
        common.run(main)
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, Dict, Iterable, Optional

from absl import app, flags

FLAGS = flags.FLAGS


# ------------------------------------------------------------ flag groups
# group title -> names of the flags it defined, for --help (in definition order).
_GROUPS: Dict[str, list] = {}


def _group(title: str, *names: str) -> None:
    _GROUPS.setdefault(title, []).extend(names)


def define_workdir_flag() -> None:
    _group("Run folder", "workdir")
    flags.DEFINE_string("workdir", None, "Folder of the run (created; re-running the "
                        "same command with it resumes). Locked while the run is live.")


def define_cluster_flags() -> None:
    """--coordinator_address, --num_processes, --process_id (multi-process jobs)."""
    _group("Multi-process jobs (BUILD.md)", "coordinator_address", "num_processes",
           "process_id", "distributed", "heartbeat_timeout")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 in a "
                        "multi-process job (jax.distributed.initialize). Leave unset on "
                        "Cloud TPU pods and SLURM, where JAX detects the cluster.")
    flags.DEFINE_integer("num_processes", None, "Processes in the job (with "
                         "--coordinator_address).")
    flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes-1 "
                         "(with --coordinator_address).")
    flags.DEFINE_boolean("distributed", False, "Call jax.distributed.initialize() even "
                         "if no cluster is detected (it then auto-detects).")
    flags.DEFINE_integer("heartbeat_timeout", 100, "Seconds after which a silent process "
                         "counts as dead and the others stop with an error.")


def define_data_flags(dataset_default: str = "mnist", multi: bool = False) -> None:
    """--dataset (or --datasets with multi=True), --data_dir and --download."""
    _group("Data", "datasets" if multi else "dataset", "data_dir", "download")
    specs = "mnist, fashion_mnist, idx:DIR (the four IDX files), npz:FILE (x_train, " \
            "y_train, x_test, y_test) or tfds:NAME"
    if multi:
        flags.DEFINE_list("datasets", dataset_default.split(","), f"Data sets, each {specs}, "
                          "or a mixture A+B (one data set per stream).")
    else:
        flags.DEFINE_string("dataset", dataset_default, f"Data set: {specs}; A,B mixes "
                            "several, one per episode.")
    flags.DEFINE_string("data_dir", None, "Folder with mnist/ and fashion_mnist/ IDX files, "
                        "the only place they are looked for when given (default: "
                        "$VSML_DATA_DIR, then the cache); tfds' data folder for tfds:NAME.")
    flags.DEFINE_boolean("download", False, "Download mnist / fashion_mnist (checksummed) "
                         "if no copy is found (into --data_dir when given, else the cache).")


def define_schedule_flags(*, num_steps: int, checkpoint_every: int, log_every: int,
                          eval_every: int) -> None:
    """--num_steps, --checkpoint_every, --log_every, --eval_every, --seed."""
    _group("Schedule", "num_steps", "checkpoint_every", "log_every", "eval_every", "seed")
    flags.DEFINE_integer("num_steps", num_steps, "Meta-training steps (generations for ES).")
    flags.DEFINE_integer("checkpoint_every", checkpoint_every, "Steps between checkpoints.")
    flags.DEFINE_integer("log_every", log_every, "Steps between progress logs.")
    flags.DEFINE_integer("eval_every", eval_every, "Steps between evaluations (0: none).")
    flags.DEFINE_integer("seed", 0, "Seed of everything random in the run.")


# ------------------------------------------------------- flags -> configs
def cluster_from_flags():
    from vsml_jax.runtime import Cluster
    try:
        return Cluster(coordinator_address=FLAGS.coordinator_address,
                       num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                       initialize=FLAGS.distributed,
                       heartbeat_timeout_s=FLAGS.heartbeat_timeout)
    except ValueError as e:
        raise app.UsageError(str(e)) from e


def _convert(value: Any, default: Any) -> Any:
    """Flag value -> config field value (lists become tuples, numbers parsed)."""
    if isinstance(value, list):
        items = [v for v in value if v != ""]
        if isinstance(default, tuple) and default and isinstance(default[0], str):
            return tuple(items)
        try:
            return tuple(int(v) for v in items)
        except ValueError:
            return tuple(items)
    return value


def config_from_flags(cls, *, unset_is_none: Iterable[str] = (),
                      convert: Optional[Dict[str, Callable[[Any], Any]]] = None):
    """`cls(**fields)` with every field of dataclass `cls` taken from the flag of
    the same name; fields in `unset_is_none` are None unless the flag was given
    (on the command line or in a flagfile). A ValueError of the config becomes
    a usage error."""
    unset_is_none, convert = set(unset_is_none), dict(convert or {})
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in FLAGS:
            continue
        if f.name in unset_is_none and not FLAGS[f.name].present:
            kwargs[f.name] = None
            continue
        value = FLAGS[f.name].value
        default = f.default if f.default is not dataclasses.MISSING else None
        kwargs[f.name] = (convert[f.name](value) if f.name in convert
                          else _convert(value, default))
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise app.UsageError(str(e)) from e


# ------------------------------------------------------------------ start
def _user_errors() -> tuple:
    """Errors that are the user's to fix: printed as one line, no traceback."""
    from vsml_jax.data import (DatasetFormatError, DatasetNotFoundError, DownloadError,
                                IDXError)
    from vsml_jax.pretrained import LearnerFileError
    from vsml_jax.runtime import ClusterStartError
    from vsml_jax.runs.common import SettingsError
    from vsml_jax.training.loop import ConfigMismatchError
    from vsml_jax.training.checkpointing import CheckpointRestoreError
    from vsml_jax.training.metrics import MetricsFileError
    from vsml_jax.training.workdir import WorkdirLockedError
    return (app.UsageError, SettingsError, ConfigMismatchError, WorkdirLockedError,
            NotADirectoryError, MetricsFileError, DatasetNotFoundError, DatasetFormatError,
            DownloadError, IDXError, LearnerFileError, FloatingPointError,
            CheckpointRestoreError, ClusterStartError)


def run(main: Callable[[list], Any], *, cluster_flags: bool = True) -> None:
    """absl's app.run(main) with the run start-up around it.

    Before `main`: `vsml_jax.runtime.start()` with the cluster flags (so a
    multi-process job is joined before anything touches a JAX backend). A
    user error (bad setting, missing data, locked or mismatched workdir, NaN
    stop) prints one line naming the problem and the fix, and exits 1.
    """
    prog = os.path.basename(sys.argv[0]) if sys.argv else "vsml_jax"
    exit_if_help_asked(sys.argv[1:])

    def wrapped(argv):
        if len(argv) > 1:
            _fail(prog, f"unexpected arguments {argv[1:]} (flags are --name=value).")
        from vsml_jax import runtime
        from vsml_jax.runs.common import describe_os_error, expand_path_flags
        try:
            expand_path_flags(FLAGS)  # ~ and $VARS, as a shell would
        except ValueError as e:
            _fail(prog, str(e))
        try:
            runtime.start(cluster_from_flags() if cluster_flags else None)
            return main(argv)
        except _user_errors() as e:
            # OSError's str() wraps the message in "[Errno N] ...: 'path'".
            _fail(prog, e.strerror if isinstance(e, OSError) and e.strerror else str(e))
        except OSError as e:  # read-only folder, full disk, file-size limit, ...
            message = describe_os_error(e)
            if message is None:
                raise
            _fail(prog, message)

    app.run(wrapped)


# --help / --helpshort: this entry point's flags, then the shared groups it
# defined here; absl's own short help lists only the entry point's module and
# exits 1. --helpfull (every flag of every library) is left to absl.
_SHORT_HELP = ("--help", "-help", "--helpshort", "-helpshort", "-?", "-h")
_FULL_HELP = ("--helpfull", "-helpfull", "--helpxml", "-helpxml")


def short_help(main_module: Optional[str] = None) -> str:
    """The entry point's docstring, its own flags, then the shared flags."""
    main = sys.modules.get("__main__")
    own = main_module or (sys.argv[0] if sys.argv else "")
    doc = (getattr(main, "__doc__", None) or "").strip()
    # The shared groups (run folder, data, schedule: what most runs set) first.
    groups = [f"{title}:\n" + "\n".join(_flag_help(n) for n in names if n in FLAGS)
              for title, names in _GROUPS.items()]
    body = FLAGS.module_help(own).strip().split("\n", 1)
    if len(body) == 2:  # drop absl's "module:" header line
        groups.append(f"Flags of this entry point:\n{body[1]}")
    groups.append("--flagfile=FILE reads flags from FILE; --helpfull lists every flag,\n"
                  "including those of the libraries.")
    return "\n\n".join(([doc] if doc else []) + groups) + "\n"


def _flag_help(name: str) -> str:
    flag = FLAGS[name]
    prefix = "--[no]" if flag.boolean else "--"
    text = f"{prefix}{name}: {flag.help}"
    if flag.default is not None:
        text += f"\n(default: {flag.default_as_str})"
    return flags.text_wrap(text, indent="    ", firstline_indent="  ")


def exit_if_help_asked(args: list) -> None:
    """Prints the help asked for in `args` (command-line arguments) and exits 0."""
    names = [a.split("=", 1)[0] for a in args]
    if any(n in _SHORT_HELP for n in names):
        sys.stdout.write(short_help())
        sys.exit(0)
    if any(n in _FULL_HELP for n in names):
        try:  # absl prints everything, then exits 1 before main
            app.run(lambda argv: None, argv=[sys.argv[0]] + [a for a in args
                                                          if a.split("=", 1)[0] in _FULL_HELP])
        except SystemExit:
            pass
        sys.exit(0)


def _fail(prog: str, message: str) -> None:
    sys.stderr.write(f"{prog}: error: {message}\n(--help lists the flags.)\n")
    sys.stderr.flush()
    sys.exit(1)
