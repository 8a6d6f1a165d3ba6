"""The run folder: its lock (real files, real processes) and the checkpoint fallback.

The lock tests run helper processes that load vsml_jax/training/workdir.py by
path, so they start in a fraction of a second (no JAX import). The fallback
tests damage real orbax checkpoints on disk.
"""
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import psutil
import pytest

from vsml_jax.training import checkpointing
from vsml_jax.training import workdir as wd

WORKDIR_PY = os.path.abspath(wd.__file__)

# A helper process: loads workdir.py by path and acts out a role.
#   crash: take the lock, print the PID, die without releasing (os._exit).
#   race:  announce readiness, wait for the start signal, try to take the lock,
#          report, then hold it until told to finish.
CHILD = textwrap.dedent(r"""
    import importlib.util, os, sys, time
    spec = importlib.util.spec_from_file_location("workdir_under_test", sys.argv[1])
    wd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wd)
    role, workdir = sys.argv[2], sys.argv[3]

    def wait_for(path, timeout=60):
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                sys.exit("timed out waiting for " + path)
            time.sleep(0.0001)

    lock = wd.WorkdirLock(workdir)
    if role == "crash":
        lock.acquire()
        print(os.getpid(), flush=True)
        os._exit(0)
    signals, me = sys.argv[4], sys.argv[5]
    open(os.path.join(signals, "ready-" + me), "w").close()
    wait_for(os.path.join(signals, "go"))
    try:
        lock.acquire()
        result = "won"
    except wd.WorkdirLockedError as e:
        result = "refused\n" + str(e)
    tmp = os.path.join(signals, "result-" + me + ".tmp")
    with open(tmp, "w") as f:
        f.write(result)
    os.replace(tmp, os.path.join(signals, "result-" + me))
    wait_for(os.path.join(signals, "done"))
    lock.release()
""")


@pytest.fixture
def child_script(tmp_path):
    path = tmp_path / "lock_child.py"
    path.write_text(CHILD)
    return str(path)


def _wait_for(paths, procs, timeout=120):
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        for p in procs:
            if p.poll() not in (None, 0):
                raise AssertionError(f"helper failed: {p.communicate()}")
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.01)


def _lock_record(**changes):
    """A lock record as this machine would write it, with `changes` applied."""
    record = wd._my_record()
    record.update(changes)
    return record


def _write_lock(workdir, record):
    path = os.path.join(workdir, wd.LOCK_FILE)
    with open(path, "w") as f:
        json.dump(record, f)
    return path


def _dead_pid():
    """The PID of a process that has run and been reaped."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(proc.stdout)
    assert not psutil.pid_exists(pid)
    return pid


# -------------------------------------------------------------- the lock
def test_second_lock_is_refused_naming_the_holder(tmp_path):
    first = wd.WorkdirLock(str(tmp_path)).acquire()
    record = json.load(open(tmp_path / ".lock"))
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert record["command"] and record["since"].startswith(time.strftime("%Y"))
    with pytest.raises(wd.WorkdirLockedError) as err:
        wd.WorkdirLock(str(tmp_path)).acquire()
    msg = str(err.value)
    for part in (f"host {socket.gethostname()}", f"PID {os.getpid()}",
                 f"since {record['since']}", f"command: {record['command']}",
                 "another --workdir", f"delete the lock file {tmp_path / '.lock'}"):
        assert part in msg, (part, msg)
    assert err.value.holder == record
    first.release()
    assert not (tmp_path / ".lock").exists()
    wd.WorkdirLock(str(tmp_path)).acquire().release()  # free again


def test_lock_of_a_crashed_run_is_taken_over_with_a_warning(tmp_path, child_script,
                                                           caplog):
    # A real run that took the lock and died without releasing it.
    proc = subprocess.run([sys.executable, child_script, WORKDIR_PY, "crash",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    dead = int(proc.stdout)
    assert json.load(open(tmp_path / ".lock"))["pid"] == dead
    assert not psutil.pid_exists(dead)
    with caplog.at_level(logging.WARNING):
        lock = wd.WorkdirLock(str(tmp_path)).acquire()
    warning = " ".join(r.getMessage() for r in caplog.records
                       if r.levelno == logging.WARNING)
    assert "stale lock" in warning and f"PID {dead}" in warning, warning
    assert f"process {dead} no longer exists" in warning
    assert json.load(open(tmp_path / ".lock"))["pid"] == os.getpid()
    lock.release()


def test_lock_whose_pid_was_reused_is_taken_over(tmp_path, caplog):
    # The PID is alive (this very process) but started at another time than
    # the holder did: the PID was recycled, the holder is gone.
    me = psutil.Process()
    _write_lock(tmp_path, _lock_record(process_start=me.create_time() - 3600.0))
    with caplog.at_level(logging.WARNING):
        lock = wd.WorkdirLock(str(tmp_path)).acquire()
    assert "now belongs to another process" in caplog.text
    lock.release()


def test_live_holder_with_matching_start_time_is_not_taken_over(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = psutil.Process(sleeper.pid).create_time()
        _write_lock(tmp_path, _lock_record(pid=sleeper.pid, process_start=start))
        with pytest.raises(wd.WorkdirLockedError, match=f"PID {sleeper.pid}"):
            wd.WorkdirLock(str(tmp_path)).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    # Now that it is dead, the same lock is stale.
    wd.WorkdirLock(str(tmp_path)).acquire().release()


def test_lock_from_another_host_is_never_taken_over(tmp_path):
    path = _write_lock(tmp_path, _lock_record(host="other-host.example", pid=_dead_pid()))
    before = open(path).read()
    with pytest.raises(wd.WorkdirLockedError) as err:
        wd.WorkdirLock(str(tmp_path)).acquire()
    msg = str(err.value)
    assert "host other-host.example" in msg and "another host" in msg
    assert "never taken over automatically" in msg and f"delete the lock file {path}" in msg
    assert open(path).read() == before
    # Same host name but another boot: fails closed as well.
    _write_lock(tmp_path, _lock_record(pid=_dead_pid(), boot_id="another-boot"))
    with pytest.raises(wd.WorkdirLockedError, match="another boot"):
        wd.WorkdirLock(str(tmp_path)).acquire()


def test_unreadable_lock_is_refused(tmp_path):
    (tmp_path / ".lock").write_text('{"host": "a", "pi')
    with pytest.raises(wd.WorkdirLockedError, match="not valid JSON"):
        wd.WorkdirLock(str(tmp_path)).acquire()


def test_context_manager_and_release_only_of_our_own_lock(tmp_path, caplog):
    with wd.WorkdirLock(str(tmp_path)) as lock:
        assert lock.held and (tmp_path / ".lock").exists()
    assert not lock.held and not (tmp_path / ".lock").exists()

    lock = wd.WorkdirLock(str(tmp_path)).acquire()
    other = _lock_record(pid=12345, host="elsewhere")  # someone replaced our file
    _write_lock(tmp_path, other)
    with caplog.at_level(logging.WARNING):
        lock.release()
    assert json.load(open(tmp_path / ".lock")) == other  # not ours: left in place
    assert "no longer this run's" in caplog.text
    wd.WorkdirLock(str(tmp_path)).release()  # never acquired: a no-op


def test_prepare_workdir_names_a_file_in_the_way(tmp_path):
    made = wd.prepare_workdir(str(tmp_path / "a" / "b"))
    assert os.path.isdir(made) and made == str(tmp_path / "a" / "b")
    assert wd.prepare_workdir(made) == made  # existing folder: fine
    blocker = tmp_path / "run"
    blocker.write_text("not a folder")
    with pytest.raises(NotADirectoryError) as err:
        wd.prepare_workdir(str(blocker))
    assert f"--workdir {blocker} is an existing file, not a folder" in str(err.value)
    assert "another --workdir" in str(err.value)
    with pytest.raises(NotADirectoryError, match="a folder above --workdir"):
        wd.prepare_workdir(str(blocker / "sub"))
    with pytest.raises(NotADirectoryError):
        wd.WorkdirLock(str(blocker)).acquire()


def test_racing_processes_exactly_one_wins(tmp_path, child_script):
    """Real processes released at the same instant: O_EXCL lets exactly one in."""
    for round_ in range(5):
        workdir, signals = tmp_path / f"run{round_}", tmp_path / f"signals{round_}"
        workdir.mkdir()
        signals.mkdir()
        names = [str(i) for i in range(4)]
        procs = [subprocess.Popen([sys.executable, child_script, WORKDIR_PY, "race",
                                   str(workdir), str(signals), n],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for n in names]
        try:
            _wait_for([signals / f"ready-{n}" for n in names], procs)
            (signals / "go").touch()  # the barrier: all poll for this file
            _wait_for([signals / f"result-{n}" for n in names], procs)
            results = {n: (signals / f"result-{n}").read_text() for n in names}
            holder = json.load(open(workdir / ".lock"))
        finally:
            (signals / "done").touch()
            for p in procs:
                p.wait(timeout=120)
        winners = [n for n, r in results.items() if r == "won"]
        assert len(winners) == 1, results
        winner_pid = procs[int(winners[0])].pid
        assert holder["pid"] == winner_pid
        for n, r in results.items():
            if n != winners[0]:
                assert r.startswith("refused") and f"PID {winner_pid}" in r, r
        assert all(p.returncode == 0 for p in procs)
        assert not (workdir / ".lock").exists()  # the winner released it


# --------------------------------------------- checkpoint fallback (orbax)
def _tree(step):
    """A small train state: arrays (incompressible, so data files are real) and a key."""
    key = jax.random.PRNGKey(step)
    return {"w": jax.random.normal(key, (64, 64)), "b": jnp.full((3,), float(step)),
            "key": jax.random.split(key)[0], "step": jnp.int32(step)}


def _target():
    return jax.tree_util.tree_map(jnp.zeros_like, _tree(0))


@pytest.fixture
def saved(tmp_path):
    """checkpoints/ with steps 2, 4, 6 (closed manager), and its path."""
    directory = str(tmp_path / "checkpoints")
    manager = checkpointing.make_manager(directory)
    for step in (2, 4, 6):
        checkpointing.save(manager, step, _tree(step))
    checkpointing.close(manager)
    return directory


def _assert_tree_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _largest_data_file(step_dir):
    """The biggest file in the step's array data folders (orbax/tensorstore `d/`)."""
    found = [os.path.join(root, f) for root, _, files in os.walk(step_dir)
             if os.path.basename(root) == "d" for f in files]
    assert found, f"no array data files under {step_dir}"
    return max(found, key=os.path.getsize)


def _damage_truncate(directory):
    path = _largest_data_file(os.path.join(directory, "6"))
    os.truncate(path, os.path.getsize(path) // 2)
    return 6


def _damage_manifest(directory):
    os.remove(os.path.join(directory, "6", "default", "manifest.ocdbt"))
    return 6


def _damage_empty_folder(directory):
    os.makedirs(os.path.join(directory, "8"))
    return 8


def _damage_structure(directory):
    # Step 6 written with a different tree (as by other code): does not fit.
    manager = checkpointing.make_manager(directory)
    manager.delete(6)
    checkpointing.save(manager, 6, {"other": jnp.ones((2,))})
    checkpointing.close(manager)
    return 6


# A failed tensorstore read leaves a callback for asyncio's closed loop; Python
# reports it as "unraisable" (harmless noise, not an error of the restore).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage,expected", [
    (_damage_truncate, "Encountered error while reading array"),
    (_damage_manifest, "NOT_FOUND"),
    (_damage_empty_folder, "Must provide `args` of type `Composite`"),
    (_damage_structure, "tree structures do not match"),
])
def test_damaged_newest_checkpoint_falls_back(saved, damage, expected, caplog):
    bad = damage(saved)
    manager = checkpointing.make_manager(saved)
    with caplog.at_level(logging.WARNING):
        step, state, skipped = checkpointing.restore_latest_good(manager, _target())
    expected_step = 4 if bad == 6 else 6
    assert step == expected_step
    _assert_tree_equal(state, _tree(expected_step))
    assert [s for s, _ in skipped] == [bad] and expected in skipped[0][1], skipped
    assert f"step {bad} in {saved} does not restore" in caplog.text
    assert expected in caplog.text
    # Moved aside, not deleted, and out of orbax's sight.
    moved = os.listdir(saved + checkpointing.DAMAGED_SUFFIX)
    assert len(moved) == 1 and moved[0].startswith(f"{bad}-"), moved
    assert not os.path.exists(os.path.join(saved, str(bad)))
    assert f"Moved the damaged checkpoint of step {bad}" in caplog.text
    assert checkpointing.latest_step(manager) == expected_step
    # The manager saves on from there, and what it saves restores.
    checkpointing.save(manager, 8, _tree(8))
    assert manager.all_steps() == ([4, 6, 8] if bad == 8 else [2, 4, 8])  # max_to_keep=3
    checkpointing.close(manager)
    fresh = checkpointing.make_manager(saved)
    step, state, skipped = checkpointing.restore_latest_good(fresh, _target())
    assert step == 8 and skipped == []
    _assert_tree_equal(state, _tree(8))
    checkpointing.close(fresh)


def test_missing_metadata_file_still_restores_exactly(saved):
    # orbax rebuilds the tree from the target when the item's _METADATA is
    # gone, so such a step is not damaged; it must restore exactly, not be skipped.
    os.remove(os.path.join(saved, "6", "default", "_METADATA"))
    manager = checkpointing.make_manager(saved)
    step, state, skipped = checkpointing.restore_latest_good(manager, _target())
    assert step == 6 and skipped == []
    _assert_tree_equal(state, _tree(6))
    assert not os.path.exists(saved + checkpointing.DAMAGED_SUFFIX)
    checkpointing.close(manager)


def test_when_no_checkpoint_restores_nothing_is_moved(saved, caplog):
    manager = checkpointing.make_manager(saved)
    wrong_target = {"w": jnp.zeros((64, 64))}  # the code's state changed
    with caplog.at_level(logging.WARNING):
        with pytest.raises(checkpointing.CheckpointRestoreError) as err:
            checkpointing.restore_latest_good(manager, wrong_target)
    assert [s for s, _ in err.value.failures] == [6, 4, 2]
    msg = str(err.value)
    assert "Nothing was moved or deleted" in msg and "another --workdir" in msg
    assert "step 6:" in msg and "step 2:" in msg
    assert sorted(os.listdir(saved)) == ["2", "4", "6"]
    assert not os.path.exists(saved + checkpointing.DAMAGED_SUFFIX)
    # With the right target the run resumes where it was.
    step, state, _ = checkpointing.restore_latest_good(manager, _target())
    assert step == 6
    _assert_tree_equal(state, _tree(6))
    checkpointing.close(manager)


def test_empty_directory_means_a_fresh_start(tmp_path):
    manager = checkpointing.make_manager(str(tmp_path / "checkpoints"))
    assert checkpointing.restore_latest_good(manager, _target()) == (None, None, [])
    checkpointing.close(manager)
