"""A run's metrics: `metrics.jsonl` (the record) and TensorBoard event files (the view).

    writer = MetricsWriter(workdir, enabled=is_primary)
    writer.write(step, "train", {"loss": 0.3, "lr": 1e-3})
    writer.write(step, "eval/mnist", {"acc@100": 0.57})
    writer.flush()            # e.g. before every checkpoint
    writer.close()

`workdir/metrics.jsonl` gets one JSON object per line, `{"step", "split",
**values}` with sorted keys, in the order written; it is what `read_metrics`
returns and what the tests and figures read. `workdir/tensorboard/` gets the
same scalars as TensorBoard events, tagged "<split>/<name>" ("train/loss",
"eval/mnist/acc@100"), so `tensorboard --logdir runs/` plots every run in
runs/. The events are written with tensorboardX, which needs neither
TensorFlow nor the tensorboard package (tensorboard is only needed to view).

Crashes and resumes:

- A crash while a line is being written leaves a torn last line
  ('{"step": 7, "spl'). `read_metrics` and a new `MetricsWriter` cut it off
  the file with a warning naming the file and line, so appends stay valid
  JSONL; a line that does not parse anywhere else is corruption and raises
  `MetricsFileError` naming the file and line.
- On resume the loop restores step s and calls `truncate_metrics(workdir, s)`:
  records after s belong to lost progress and are dropped. TensorBoard event
  files are append-only, so the events of those lost steps stay on disk; a
  new `MetricsWriter` in a workdir that already has events starts its file
  with TensorBoard's restart marker (SessionLog START at the first step after
  the last record in metrics.jsonl). TensorBoard then shows the resumed run's
  values for the steps it writes again: the Python loader hides every event
  of the lost steps; the fast (Rust) loader replaces the points of each tag
  that is written again and keeps old points of a tag that is not (e.g. an
  eval at a step the resumed run, with another eval_every, skips). A resumed
  run repeats the lost steps bit-identically, so the curves agree either way.

Multi-process jobs: every process may construct a writer, but only process 0
should pass enabled=True (the others become no-ops and create no files).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
from absl import logging

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsFileError(ValueError):
    """metrics.jsonl holds a corrupt record that is not a torn last line."""


# ---------------------------------------------------------------- reading
def _parse(line: bytes) -> Optional[Dict[str, Any]]:
    """The record on `line`, or None if it is not a JSON object with an int "step"."""
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


def _is_blank(line: bytes) -> bool:
    # NULs too: after a power loss a file can end in zero-filled blocks.
    return not line.strip(b" \t\r\n\x00")


def _cut_torn_tail(path: str, offset: int, line_no: int, line: bytes,
                   repair: bool) -> None:
    shown = line[:80].decode("utf-8", "replace")
    if repair:
        os.truncate(path, offset)
        logging.warning("%s: line %d is torn (%r), as a crash while writing leaves it; "
                        "cut it off the file.", path, line_no, shown)
    else:
        logging.warning("%s: line %d is torn (%r), as a crash while writing leaves it; "
                        "skipped it.", path, line_no, shown)


def read_metrics(workdir: str, repair: bool = True) -> List[Dict[str, Any]]:
    """All records of workdir/metrics.jsonl, in file order (empty if there is no file).

    Args:
      workdir: the run folder.
      repair: cut a torn last line off the file (True), or only skip it
        (False: for readers that must not write, e.g. non-primary processes).
    Raises:
      MetricsFileError: a line other than the last is not a JSON record; the
        message names the file and the line.
    """
    path = os.path.join(workdir, METRICS_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    # Index of the last line with content: only that one may be torn.
    last = max((i for i, line in enumerate(lines) if not _is_blank(line)), default=-1)
    records, offset = [], 0
    for i, line in enumerate(lines):
        if not _is_blank(line):
            record = _parse(line)
            if record is None:
                if i == last:
                    _cut_torn_tail(path, offset, i + 1, line, repair)
                    break
                raise MetricsFileError(
                    f"{path}: line {i + 1} is not a metrics record (a JSON object with "
                    f"a \"step\"): {line[:200].decode('utf-8', 'replace')!r}. Only a torn "
                    f"last line is repaired automatically; fix or delete line {i + 1} "
                    f"(of {last + 1}) by hand.")
            records.append(record)
        offset += len(line) + 1
    else:
        if repair and data and not data.endswith(b"\n"):
            # A complete last record without its newline: keep it and end the
            # line, or the next append would join it.
            with open(path, "ab") as f:
                f.write(b"\n")
    return records


def _tail_record(path: str, repair: bool) -> Optional[Dict[str, Any]]:
    """The last record of `path` (cutting a torn last line), reading only the tail.

    A writer opening a long run's file must not parse all of it.
    """
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return None
    chunk = 1 << 16
    with open(path, "rb") as f:
        while True:
            start = max(0, size - chunk)
            f.seek(start)
            tail = f.read(size - start)
            lines = tail.split(b"\n")
            filled = [i for i, line in enumerate(lines) if not _is_blank(line)]
            # Need the whole last line: a newline before it, or the file start.
            if start == 0 or (filled and filled[-1] > 0):
                break
            chunk *= 4
    if not filled:
        return None
    i = filled[-1]
    record = _parse(lines[i])
    if record is not None:
        if repair and not tail.endswith(b"\n"):
            with open(path, "ab") as f:
                f.write(b"\n")
        return record
    # Line number for the warning: count newlines before the torn line.
    offset = start + sum(len(line) + 1 for line in lines[:i])
    with open(path, "rb") as f:
        line_no = f.read(offset).count(b"\n") + 1
    _cut_torn_tail(path, offset, line_no, lines[i], repair)
    return _tail_record(path, repair) if repair else None


def truncate_metrics(workdir: str, last_step: int) -> None:
    """Drops the records of steps after `last_step` from workdir/metrics.jsonl.

    Used on resume from checkpoint `last_step` (0: a fresh start), as those
    records belong to lost progress; the order of the kept records (several
    splits per step) is unchanged. The file is rewritten atomically (temporary
    file + os.replace), so a crash leaves either the old or the new file.
    Call it before opening a `MetricsWriter` on the workdir.
    """
    path = os.path.join(workdir, METRICS_FILE)
    records = read_metrics(workdir)
    kept = [r for r in records if r["step"] <= last_step]
    if not os.path.exists(path) or len(kept) == len(records):
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in kept:
            f.write(json.dumps(r, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- writing
def _to_float(value: Any) -> float:
    """A Python float from a number, numpy or (already fetched) JAX scalar."""
    return float(np.asarray(value))


class MetricsWriter:
    """Appends metrics records to metrics.jsonl and TensorBoard events.

    Args:
      workdir: the run folder (must exist).
      enabled: False makes every method a no-op that creates no file (for
        the non-primary processes of a multi-process job).
      tensorboard: also write TensorBoard events to workdir/tensorboard/.
      resume_step: the step the run resumes after; TensorBoard hides the
        events of later steps written before. Default: the last step in
        metrics.jsonl (which `truncate_metrics` has cut to the resume step).
      flush_secs: TensorBoard's event files are flushed at least this often
        (and on `flush()`/`close()`); metrics.jsonl only on `flush()`/`close()`.
    """

    def __init__(self, workdir: str, enabled: bool = True, *, tensorboard: bool = True,
                 resume_step: Optional[int] = None, flush_secs: int = 30):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIR)
        self._file = self._events = None
        if not enabled:
            return
        last = _tail_record(self.path, repair=True)  # also cuts a torn last line
        self._file = open(self.path, "a")
        if tensorboard:
            self._events = self._open_events(
                resume_step if resume_step is not None else (last["step"] if last else 0),
                flush_secs)

    def _open_events(self, resume_step: int, flush_secs: int):
        from tensorboardX import FileWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        resuming = os.path.isdir(self.tensorboard_dir) and any(
            ".tfevents." in name for name in os.listdir(self.tensorboard_dir))
        # tensorboardX names files events.out.tfevents.<seconds>.<host> and
        # opens them with "wb": a writer opened in the same second (a quick
        # crash and resume) would overwrite the last one's file. The suffix
        # makes names unique and sorts them in creation order, which is the
        # order TensorBoard reads them in (the restart marker must come later).
        events = FileWriter(self.tensorboard_dir, flush_secs=flush_secs,
                            filename_suffix=f".{time.time_ns():020d}.{os.getpid()}")
        if resuming:
            # TensorBoard's restart marker: events at steps >= this one written
            # before it are orphans of a crashed run (see the module docstring).
            events.add_event(Event(session_log=SessionLog(status=SessionLog.START)),
                             step=resume_step + 1)
        return events

    def write(self, step: int, split: str, values: Mapping[str, Any]) -> None:
        """Appends the record {"step": step, "split": split, **values}.

        `values` are scalars (Python, numpy or host JAX numbers); they become
        TensorBoard scalars tagged "<split>/<name>". Buffered until `flush()`.
        """
        if not self.enabled:
            return
        step = int(step)
        values = {k: _to_float(v) for k, v in values.items()}
        self._file.write(json.dumps({"step": step, "split": split, **values},
                                    sort_keys=True) + "\n")
        if self._events is not None:
            from tensorboardX.proto.summary_pb2 import Summary

            # A Summary proto, not SummaryWriter.add_scalar: that rewrites tags
            # outside [-/\w.] ("acc@100" -> "acc_100"); TensorBoard takes any tag.
            summary = Summary(value=[Summary.Value(tag=f"{split}/{name}", simple_value=v)
                                     for name, v in values.items()])
            self._events.add_summary(summary, global_step=step)

    def flush(self) -> None:
        """Writes buffered records to disk (metrics.jsonl and event files)."""
        if not self.enabled or self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        """Flushes and closes; further writes are errors (a no-op when disabled)."""
        if not self.enabled or self._file is None:
            return
        self.flush()
        self._file.close()
        if self._events is not None:
            self._events.close()
        self._file = self._events = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
