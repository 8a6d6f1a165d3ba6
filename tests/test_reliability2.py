"""Every state can be gone back to; a checkpoint knows what it is; output folders
and paths fail loudly (library level: in-process, real orbax checkpoints).

The NaN stop's printed command is run to the end by
test_reliability.py::test_nan_stop_gives_a_command_that_resumes (entry point).
"""
import errno
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from vsml_jax.data import Dataset
from vsml_jax.runs import common
from vsml_jax.runs.evaluate import check_stream_length, snapshot_learner
from vsml_jax.runs.meta_train import MetaTrainConfig
from vsml_jax.training import checkpointing, loop
from vsml_jax.training.workdir import WorkdirLockedError


def _step(state):
    key, sub = jax.random.split(state["key"])
    w = state["w"] + jax.random.normal(sub, state["w"].shape)
    return {"w": w, "key": key}, {"loss": jnp.mean(w ** 2)}


def _init():
    return {"w": jnp.zeros((3,)), "key": jax.random.PRNGKey(0)}


def _run(workdir, num_steps, config=None, **kw):
    return loop.run(str(workdir), _init, jax.jit(_step), num_steps,
                    config_dict=config or {"lr": 1}, checkpoint_every=1, log_every=1, **kw)


def _steps(workdir):
    return checkpointing.all_steps(checkpointing.make_manager(
        os.path.join(workdir, loop.CHECKPOINT_DIR), max_to_keep=None))


def test_keeps_first_and_last_k_and_restore_step_resumes_identically(tmp_path):
    straight = _run(tmp_path / "a", 6)
    _run(tmp_path / "b", 6, max_to_keep=2)
    assert _steps(tmp_path / "b") == [1, 5, 6]
    # Back to step 1: 5 and 6 are moved aside (never deleted), the run redone.
    again = _run(tmp_path / "b", 6, max_to_keep=2, restore_step=1)
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints_rolled_back"))[0].startswith("5-")
    np.testing.assert_array_equal(np.asarray(again.state["w"]), np.asarray(straight.state["w"]))
    assert loop.read_metrics(tmp_path / "a") == loop.read_metrics(tmp_path / "b")
    with pytest.raises(loop.ConfigMismatchError, match=r"steps \[1, 5, 6\]"):
        _run(tmp_path / "b", 6, restore_step=3)


def test_good_steps_skip_exploded_and_nonfinite():
    losses = {1: 2.3, 2: 2.2, 3: 2.1, 4: 7e36, 5: 3e37}
    # Step s is judged by the loss of step s + 1 (computed with its parameters).
    assert loop.good_steps([1, 2, 3, 4, 5], losses, bad_step=6) == [2, 1]
    assert loop.good_steps([1, 2], {1: 1.0, 2: float("nan")}, bad_step=3) == []


def test_flipped_bit_is_damage_moved_aside_and_older_step_used(tmp_path):
    straight = _run(tmp_path / "a", 4)
    _run(tmp_path / "b", 3)
    files = glob.glob(str(tmp_path / "b" / "checkpoints" / "3" / "default" / "**" / "d" /
                          "*"), recursive=True)
    assert files
    # Flip one bit in the middle of every data file of step 3.
    for path in files:
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0x01
        open(path, "wb").write(bytes(data))
    resumed = _run(tmp_path / "b", 4)
    assert os.listdir(tmp_path / "b" / "checkpoints_damaged")[0].startswith("3-")
    np.testing.assert_array_equal(np.asarray(resumed.state["w"]),
                                  np.asarray(straight.state["w"]))


def test_checkpoint_config_checked_when_config_json_is_gone(tmp_path):
    _run(tmp_path, 2, {"dataset": "mnist", "episode_length": 20})
    os.remove(tmp_path / loop.CONFIG_FILE)
    with pytest.raises(loop.ConfigMismatchError, match="dataset: 'mnist' -> 'fashion"):
        _run(tmp_path, 3, {"dataset": "fashion_mnist", "episode_length": 30})


def test_changed_data_refused_unless_allowed(tmp_path):
    def data(classes):
        images = np.linspace(0, 1, 40 * 4, dtype=np.float32).reshape(40, 4)
        labels = (np.arange(40) % classes).astype(np.int32)
        return common.data_fingerprint(Dataset(images, labels, classes, "npz:f", "f"))
    _run(tmp_path, 2, checkpoint_meta={"data": data(10)})
    with pytest.raises(loop.DataChangedError, match="num_classes: 10 -> 2.*allow_data"):
        _run(tmp_path, 3, checkpoint_meta={"data": data(2)})
    _run(tmp_path, 3, checkpoint_meta={"data": data(2)}, allow_data_change=True)
    history = json.load(open(tmp_path / loop.CONFIG_FILE))[loop.RESUME_CHANGES]
    assert history[-1]["data_change"]["num_classes"] == [10, 2]


def test_eval_every_needs_eval_datasets():
    with pytest.raises(ValueError, match="--eval_every=3 needs"):
        MetaTrainConfig(eval_every=3, eval_datasets=())


def test_path_flags_expand_home_and_vars_and_refuse_empty(monkeypatch):
    monkeypatch.setenv("HOME", "/home/u")
    monkeypatch.setenv("RUNS", "/data/runs")
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    flags.DEFINE_list("datasets", [], "", flag_values=fv)
    fv(["prog", "--workdir=~/x", "--datasets=npz:$RUNS/a.npz+mnist,idx:~/d"])
    common.expand_path_flags(fv)
    assert fv.workdir == "/home/u/x"
    assert fv.datasets == ["npz:/data/runs/a.npz+mnist", "idx:/home/u/d"]
    fv2 = flags.FlagValues()
    flags.DEFINE_string("out_dir", None, "", flag_values=fv2)
    fv2(["prog", "--out_dir="])
    with pytest.raises(ValueError, match="--out_dir= is empty"):
        common.expand_path_flags(fv2)


@pytest.mark.parametrize("code,fix", [(errno.ENOSPC, "free disk space"),
                                      (errno.EROFS, "read-only"), (errno.EFBIG, "ulimit"),
                                      (errno.EACCES, "writable")])
def test_os_errors_are_one_line_with_path_cause_and_fix(code, fix):
    message = common.describe_os_error(OSError(code, os.strerror(code), "/runs/x/f"))
    assert "/runs/x/f" in message and errno.errorcode[code] in message and fix in message
    assert common.describe_os_error(OSError(errno.EINTR, "x")) is None


def test_out_dir_is_locked_and_never_overwritten(tmp_path):
    out = str(tmp_path / "out")
    lock = common.claim_out_dir(out, "summary.json")
    with pytest.raises(WorkdirLockedError):
        common.claim_out_dir(out, "summary.json")  # a second run while the first writes
    open(os.path.join(out, "summary.json"), "w").write("{}")
    lock.release()
    with pytest.raises(common.OutDirTakenError, match="already holds summary.json"):
        common.claim_out_dir(out, "summary.json")  # a later run


def test_stream_longer_than_split_is_an_error_naming_both_numbers():
    data = Dataset(np.zeros((100, 4), np.float32), np.zeros((100,), np.int32), 10)
    with pytest.raises(common.SettingsError, match=r"episode_length=500 .* 100 examples"):
        check_stream_length("npz:f", data, "test", 500, 0, False, print)
    seen = []
    check_stream_length("npz:f", data, "test", 500, 0, True, seen.append)
    assert "with replacement" in seen[0]
    check_stream_length("npz:f", data, "test", 100, 0, False, print)


def test_live_workdir_learner_is_read_once_with_its_step(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "learner.json").write_text(json.dumps({"meta_training": {"steps": 135}}))
    (run / "params.msgpack").write_bytes(b"p135")
    snap = tmp_path / "snap"
    snap.mkdir()
    path, step = snapshot_learner(str(run), str(snap))
    (run / "params.msgpack").write_bytes(b"p145")  # the live run writes on
    assert step == 135 and open(os.path.join(path, "params.msgpack"), "rb").read() == b"p135"


def test_checksum_mismatch_counts_as_damage(tmp_path):
    """Arrays that still decode but differ from the saved ones (the stored SHA-256)."""
    _run(tmp_path, 3)
    meta_path = tmp_path / "checkpoints" / "3" / checkpointing.META_FILE
    meta = json.loads(meta_path.read_text())
    meta["digest"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    manager = checkpointing.make_manager(str(tmp_path / "checkpoints"), max_to_keep=None)
    step, _, skipped = checkpointing.restore_latest_good(manager, _init())
    assert step == 2 and skipped[0][0] == 3 and "SHA-256" in skipped[0][1]


def test_dangling_symlink_workdir_is_named_as_such(tmp_path):
    from vsml_jax.training.workdir import prepare_workdir
    link = tmp_path / "run"
    os.symlink(tmp_path / "missing" / "deeper", link)
    for path in (link, link / "sub"):
        with pytest.raises(NotADirectoryError, match="symbolic link to .*does not exist"):
            prepare_workdir(str(path))


def test_processes_with_different_flags_stop_naming_them(tmp_path):
    """Two processes of one job, one given another --lr: both stop at start-up."""
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
    env.pop("XLA_FLAGS", None)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen(
        [sys.executable, "-m", "experiments.meta_train", f"--workdir={tmp_path / 'run'}",
         "--dataset=synthetic", "--pool=4", "--synthetic_size=8", "--hidden_size=2",
         "--msg_size=2", "--micro_ticks=1", "--episode_length=2", "--batch_size=2",
         "--num_steps=1", f"--lr={lr}", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}", "--heartbeat_timeout=10"],
        cwd=repo, env=env, stderr=subprocess.PIPE, text=True)
        for i, lr in enumerate(("0.01", "0.02"))]
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], errs
    assert all("different settings: lr" in e for e in errs), errs[0][-2000:]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
