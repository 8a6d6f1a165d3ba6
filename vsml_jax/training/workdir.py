"""A run's working folder: creating it, and locking it against a second run.

Two runs writing one workdir interleave their checkpoints and metrics and
corrupt both, so a run holds `workdir/.lock` while it is live:

    prepare_workdir(workdir)                 # a folder (a clear error if a file)
    with WorkdirLock(workdir):               # or lock.acquire() ... lock.release()
        ...train...

The lock file is created atomically (`O_CREAT | O_EXCL`: of two runs racing,
exactly one creates it) and holds JSON naming its holder:

    {"format": "vsml_jax.workdir_lock/1", "host": ..., "pid": ...,
     "since": "2025-01-31T12:00:00+00:00", "command": "python -m ...",
     "process_start": <epoch seconds>, "boot_id": ..., "pid_namespace": ...,
     "token": <random id of this acquisition>}

A second run is refused with `WorkdirLockedError`, whose message names the
holder and what to do. A lock left behind by a run that died is *stale* and is
taken over with a warning, but only when that is provable from here: the lock
was taken on this machine (same host name, boot and PID namespace) and its
process is gone, a zombie, or its PID now belongs to a process that started
at another time (PID reuse; start times come from psutil). A lock taken on
another host is never taken over: its process cannot be inspected from here,
so the message says to delete the file by hand if that run is known dead.
Takeovers by runs on one machine are serialised with an flock on
`workdir/.lock.takeover` (an empty file that stays), so two runs that find
the same stale lock cannot both take it.

Why not the `filelock` package: its SoftFileLock (O_EXCL + PID/host stale
detection since filelock 3.22) keeps the holder in a private three-line format
that cannot carry the command line and start time the refusal message needs,
and it takes a stale lock over silently; a sidecar file for the description
would not be atomic with the lock. The part that is easy to get wrong, telling
a dead process from a live one, is delegated to psutil.

Multi-process jobs: only process 0 should call `acquire`/`release` (the other
processes of the same run would otherwise be refused by process 0's lock).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shlex
import socket
import sys
import time
import uuid
from typing import Any, Dict, Iterator, Optional, Tuple

import psutil
from absl import logging

try:  # POSIX only; without it stale takeovers are not serialised (see _takeover_guard).
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_FILE = ".lock"
LOCK_FORMAT = "vsml_jax.workdir_lock/1"
# A lock whose holder has the same PID but a start time this far from the
# recorded one belongs to another process. psutil derives create_time from
# clock ticks since boot (10 ms), so 1 s never separates a process from itself,
# while a recycled PID needs the whole PID range to wrap around first.
_START_TIME_TOLERANCE_S = 1.0
# A lock file that does not parse may be in the microseconds between its
# O_EXCL creation and the holder's write: re-read for this long before judging.
_UNREADABLE_GRACE_S = 0.5


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir (or its lock cannot be judged safely).

    Attributes:
      path: the lock file.
      holder: the lock file's JSON (dict), or None if it could not be read.
    """

    def __init__(self, message: str, path: str, holder: Optional[Dict[str, Any]]):
        super().__init__(message)
        self.path = path
        self.holder = holder


# ------------------------------------------------------------------ workdir
def prepare_workdir(path: str, flag: str = "--workdir") -> str:
    """Creates the run folder `path` (and its parents) if missing; returns its absolute path.

    Raises:
      NotADirectoryError: `path`, or a folder above it, is an existing file
        (os.makedirs would raise a bare FileExistsError naming no fix).
    """
    path = os.path.abspath(os.fspath(path))
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError, FileNotFoundError) as e:
        blocker = path
        while blocker and not os.path.lexists(blocker):
            blocker = os.path.dirname(blocker)
        if os.path.islink(blocker) and not os.path.exists(blocker):
            raise NotADirectoryError(
                errno.ENOENT,
                f"{blocker} is a symbolic link to {os.readlink(blocker)}, which does not "
                f"exist: create that folder, remove the link, or choose another path.",
                blocker) from e
        if isinstance(e, FileNotFoundError):
            raise
        what = (f"{flag} {path}" if blocker == path else
                f"{blocker}, a folder above {flag} {path},")
        raise NotADirectoryError(
            errno.ENOTDIR,
            f"{what} is an existing file, not a folder: a run's {flag[2:]} is a folder "
            f"that holds its files. Choose another {flag}, or "
            f"move the file {blocker} away.", blocker) from e
    return path


# -------------------------------------------------------------- identity
def _boot_id() -> Optional[str]:
    """The kernel's id of the current boot (Linux), telling two machines apart."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_namespace() -> Optional[int]:
    """The inode of this process's PID namespace (Linux): PIDs are only comparable within one."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _command_line() -> str:
    try:
        return shlex.join(psutil.Process().cmdline())
    except (psutil.Error, OSError):
        return shlex.join([sys.executable, *sys.argv])


def _my_record() -> Dict[str, Any]:
    me = psutil.Process()
    return {
        "format": LOCK_FORMAT,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command_line(),
        "process_start": me.create_time(),
        "boot_id": _boot_id(),
        "pid_namespace": _pid_namespace(),
        "token": uuid.uuid4().hex,
    }


def _same_machine(holder: Dict[str, Any]) -> Tuple[bool, str]:
    """(whether the holder's PID can be inspected from here, why not)."""
    if holder.get("host") != socket.gethostname():
        return False, f"it was taken on another host ({holder.get('host')!r})"
    mine, theirs = _boot_id(), holder.get("boot_id")
    if mine is not None and theirs is not None and mine != theirs:
        # Same name, other boot: this machine before a reboot, or another
        # machine of the same name. Both are possible, so fail closed.
        return False, (f"it was taken on a host named {holder.get('host')!r} but under "
                       f"another boot (this machine before a reboot, or another machine "
                       f"of the same name)")
    mine, theirs = _pid_namespace(), holder.get("pid_namespace")
    if mine is not None and theirs is not None and mine != theirs:
        return False, "it was taken in another PID namespace (another container)"
    return True, ""


def _stale_reason(holder: Dict[str, Any]) -> Optional[str]:
    """Why the same-machine `holder` is provably dead, or None if it may be alive."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return f"process {pid} has exited (zombie)"
        started = proc.create_time()
    except psutil.NoSuchProcess:
        return f"process {pid} no longer exists"
    except psutil.Error:  # AccessDenied and the like: cannot tell, so it holds.
        return None
    recorded = holder.get("process_start")
    if isinstance(recorded, (int, float)) and abs(started - recorded) > _START_TIME_TOLERANCE_S:
        return (f"PID {pid} now belongs to another process (started "
                f"{_iso(started)}, the holder started {_iso(recorded)})")
    return None


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat(
        timespec="seconds")


def describe_holder(holder: Optional[Dict[str, Any]]) -> str:
    """One line naming a lock's holder: host, PID, since when, command."""
    if not holder:
        return "an unknown holder (the lock file is empty or not valid JSON)"
    return (f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, since "
            f"{holder.get('since', '?')}, command: {holder.get('command', '?')}")


# ------------------------------------------------------------------ lock
_HELD: set = set()  # the locks this process holds (for release_all)


def release_all() -> None:
    """Releases every lock this process holds (e.g. before an immediate exit on SIGTERM)."""
    for lock in list(_HELD):
        with contextlib.suppress(Exception):
            lock.release()


class WorkdirLock:
    """Exclusive ownership of a run folder through `<workdir>/.lock`.

    `acquire()` takes it or raises `WorkdirLockedError`; `release()` removes
    the file only if it is still this object's. A context manager too.
    """

    def __init__(self, workdir: str, flag: str = "--workdir"):
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.flag = flag  # the flag that named the folder, for messages
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._record: Optional[Dict[str, Any]] = None

    @property
    def held(self) -> bool:
        """Whether this object acquired the lock (and has not released it)."""
        return self._record is not None

    def acquire(self) -> "WorkdirLock":
        """Takes the lock, taking over a provably stale one with a warning.

        Returns:
          self.
        Raises:
          WorkdirLockedError: a live run holds it, it was taken on another
            host, or its file cannot be read.
          NotADirectoryError: the workdir is a file (see prepare_workdir).
        """
        if self.held:
            return self
        prepare_workdir(self.workdir, self.flag)
        # Three rounds: a takeover can lose the following O_EXCL to a third
        # run that started meanwhile; that run then holds the lock legitimately.
        for _ in range(3):
            record = _my_record()
            if self._create(record):
                self._record = record
                _HELD.add(self)
                return self
            raw, holder = self._read_settled()
            if raw is None:
                continue  # released between our attempt and the read: try again
            if holder is None:
                raise WorkdirLockedError(self._message(
                    None, "its lock file is not valid JSON, so its holder cannot be "
                    "checked"), self.path, None)
            local, why_not = _same_machine(holder)
            if not local:
                raise WorkdirLockedError(self._message(
                    holder, f"{why_not}, where this process cannot check whether that "
                    f"run is still alive, so the lock is never taken over automatically"),
                    self.path, holder)
            reason = _stale_reason(holder)
            if reason is None:
                raise WorkdirLockedError(self._message(holder, None), self.path, holder)
            if self._remove_if_unchanged(raw):
                logging.warning("Took over the stale lock %s of a run that died: %s "
                                "(%s).", self.path, describe_holder(holder), reason)
        raise WorkdirLockedError(self._message(
            None, "it kept changing hands while this run tried to take it"), self.path,
            None)

    def release(self) -> None:
        """Removes the lock file if it is still ours (a no-op when not held)."""
        if self._record is None:
            return
        token, self._record = self._record["token"], None
        _HELD.discard(self)
        _, holder = self._read()
        if holder is None or holder.get("token") != token:
            logging.warning("The lock %s is no longer this run's (now: %s); left in place.",
                            self.path, describe_holder(holder) if holder else "missing")
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------ helpers
    def _create(self, record: Dict[str, Any]) -> bool:
        """Atomically creates the lock file with `record`; False if it exists."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            # One write of a few hundred bytes: readers see it whole or (for
            # microseconds) empty, which _read_settled waits out.
            os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.remove(self.path)
            raise
        os.close(fd)
        return True

    def _read(self) -> Tuple[Optional[bytes], Optional[Dict[str, Any]]]:
        """(raw bytes or None if missing, parsed record or None if not a lock record)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(raw)
        except ValueError:
            return raw, None
        return raw, holder if isinstance(holder, dict) else None

    def _read_settled(self) -> Tuple[Optional[bytes], Optional[Dict[str, Any]]]:
        """Like _read, but gives a holder that is still writing its record time to finish."""
        deadline = time.monotonic() + _UNREADABLE_GRACE_S
        while True:
            raw, holder = self._read()
            if raw is None or holder is not None or time.monotonic() > deadline:
                return raw, holder
            time.sleep(0.02)

    def _remove_if_unchanged(self, judged: bytes) -> bool:
        """Removes the lock file if it still holds exactly `judged` (the stale record).

        Two runs on this machine may judge the same stale lock at once; without
        serialising them, one could remove the fresh lock the other has just
        created. The takeover guard makes "compare, then remove" atomic among
        them (only same-machine runs ever take a lock over).
        """
        with self._takeover_guard():
            raw, _ = self._read()
            if raw != judged:
                return False
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            return True

    @contextlib.contextmanager
    def _takeover_guard(self) -> Iterator[None]:
        # Hand-written with fcntl.flock (the same call filelock's UnixFileLock
        # makes) rather than a dependency for five lines; the kernel drops it
        # when the process dies, so the guard itself can never go stale.
        if fcntl is None:
            yield
            return
        fd = os.open(self.path + ".takeover", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:  # e.g. a network file system without flock
                logging.warning("Cannot serialise the takeover of %s (%s); going on "
                                "without.", self.path, e)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def _message(self, holder: Optional[Dict[str, Any]], why: Optional[str]) -> str:
        who = describe_holder(holder)
        if why is None:
            head = f"The {self.flag[2:]} {self.workdir} is in use by another run ({who})."
            fix = (f"Wait for that run to finish, or use another {self.flag}. If you are "
                   f"sure it is dead, delete the lock file {self.path}.")
        else:
            head = f"The {self.flag[2:]} {self.workdir} is locked by {who}: {why}."
            fix = (f"If no run uses this {self.flag[2:]} any more, delete the lock file "
                   f"{self.path}; otherwise wait for that run to finish, or use another "
                   f"{self.flag}.")
        return f"{head} {fix}"
