"""Every state can be gone back to; a checkpoint knows what it is; output folders
and paths fail loudly (library level: in-process, real orbax checkpoints).

The NaN stop's printed command is run to the end by
test_reliability.py::test_nan_stop_gives_a_command_that_resumes (entry point).
"""
import contextlib
import errno
import glob
import json
import logging
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
    # A clone's learner.json counts its steps under "cloning" ("clone" is its spec).
    (run / "learner.json").write_text(json.dumps({"clone": {"steps": 4},
                                                  "cloning": {"steps": 7}}))
    assert snapshot_learner(str(run), str(snap))[1] == 7


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


_TINY = ("--dataset=synthetic", "--pool=4", "--synthetic_size=8", "--hidden_size=2",
         "--msg_size=2", "--micro_ticks=1")


def _entry(module, *args, devices=1):
    """`python -m experiments.<module> *args` in a fresh process on `devices` CPU devices."""
    import subprocess
    import sys
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
    env.pop("XLA_FLAGS", None)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=300)


def test_open_es_population_suggestion_is_even_and_divisible(tmp_path):
    """--popsize=16 on 3 devices: the sizes offered satisfy both rules (12 or 18)."""
    result = _entry("meta_train", f"--workdir={tmp_path / 'run'}", *_TINY,
                    "--episode_length=2", "--batch_size=3", "--meta_optimizer=open_es",
                    "--popsize=16", "--num_steps=1", "--eval_every=0", devices=3)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "--popsize=16 must be a multiple of the 3 devices it is split over and even" \
        in result.stderr and "use --popsize=12 or 18" in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr[-2000:]
    from vsml_jax.meta.sharding import check_divisible, device_mesh
    mesh3 = device_mesh(jax.devices()[:3])
    check_divisible("--popsize", 18, mesh3, even=True)
    with pytest.raises(ValueError, match="use --popsize=6 or 12"):
        check_divisible("--popsize", 9, mesh3, even=True)  # 9 fits 3 devices, is odd
    check_divisible("--batch_size", 9, mesh3)


def test_a_step_too_big_for_memory_is_refused_before_the_run(tmp_path):
    """~4 TB by XLA's estimate: refused in one message naming the fixes, nothing written."""
    result = _entry("meta_train", f"--workdir={tmp_path / 'run'}", *_TINY,
                    "--episode_length=1000000", "--batch_size=512", "--num_steps=1",
                    "--eval_every=0")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "The training step needs about" in result.stderr
    assert "--remat_chunk=1000" in result.stderr and "--micro_batch" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@contextlib.contextmanager
def _compile_log():
    """Yields the list of JAX's log messages (compilations included, via
    jax.log_compiles) written while the block runs."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("jax").addHandler(handler)
    try:
        with jax.log_compiles():
            yield messages
    finally:
        logging.getLogger("jax").removeHandler(handler)


def test_memory_check_compiles_the_step_the_run_then_uses(tmp_path):
    """The estimate's compilation is the run's: jit(_step) is compiled once."""
    from vsml_jax.runs import meta_train as mt
    cfg = MetaTrainConfig(dataset="synthetic", pool=4, synthetic_size=8, hidden_size=2,
                          msg_size=2, micro_ticks=1, episode_length=2, batch_size=8,
                          num_steps=2, eval_every=0, log_every=1)
    with _compile_log() as messages:
        built = mt._build(cfg)
        need = mt.check_memory(cfg, built)
        mt._train(cfg, str(tmp_path / "run"), built)
    assert need and need < 2 ** 30
    step_compiles = [m for m in messages if m.startswith("Finished XLA compilation of "
                                                          "jit(_step)")]
    assert len(step_compiles) == 1, step_compiles


@pytest.mark.parametrize("kind", ["meta_train", "clone"])
def test_a_locked_workdir_is_refused_before_the_step_compiles(tmp_path, kind):
    """A second run on a live workdir fails on the lock at once: the memory
    check, which compiles the step, runs only once the workdir is held."""
    from vsml_jax.runs import clone, meta_train as mt
    from vsml_jax.training.workdir import WorkdirLock
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    holder = WorkdirLock(workdir).acquire()
    try:
        with _compile_log() as messages, pytest.raises(WorkdirLockedError):
            if kind == "meta_train":
                mt.train_and_evaluate(mt.MetaTrainConfig(
                    dataset="synthetic", pool=4, synthetic_size=8, hidden_size=2,
                    msg_size=2, micro_ticks=1, episode_length=2, batch_size=8,
                    num_steps=2, eval_every=0), workdir)
            else:
                clone.train_and_evaluate(clone.CloneConfig(
                    stage="nearest_mean", hidden_size=4, msg_size=4, micro_ticks=1,
                    batch_size=8, unroll_steps=2, eval_cells=8, num_steps=2), workdir)
    finally:
        holder.release()
    assert not [m for m in messages if "jit(_step)" in m], messages


def test_damaged_params_file_is_named_as_damaged_not_a_mismatch(tmp_path):
    import vsml_jax
    from vsml_jax.learners import vsml_learner
    from vsml_jax.pretrained import LearnerFileError, load_learner, save_learner
    cfg = vsml_jax.VSMLConfig(layer_sizes=(49, 10), hidden_size=2, msg_size=2, micro_ticks=1)
    learner = vsml_learner(cfg)
    folder = tmp_path / "run"
    save_learner(str(folder), learner, learner.init_params(jax.random.key(0)), {"pool": 4})
    params = folder / "params.msgpack"
    whole = params.read_bytes()
    for damaged in (whole[: len(whole) // 2], b"", whole + b"\x00"):
        params.write_bytes(damaged)
        with pytest.raises(LearnerFileError, match=r"params.msgpack is damaged .*copy it again"):
            load_learner(str(folder))
    # A whole file of another architecture is still a mismatch, not damage.
    other = vsml_learner(cfg.replace(hidden_size=3))
    save_learner(str(tmp_path / "other"), other, other.init_params(jax.random.key(0)),
                 {"pool": 4})
    params.write_bytes((tmp_path / "other" / "params.msgpack").read_bytes())
    with pytest.raises(LearnerFileError, match="do not match the vsml config"):
        load_learner(str(folder))
    # At the entry point: one line naming the file.
    params.write_bytes(whole[:100])
    result = _entry("evaluate", f"--checkpoint={folder}", "--datasets=mnist",
                    "--episode_length=10", "--seeds=1", f"--out_dir={tmp_path / 'out'}")
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"{params} is damaged" in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr[-2000:]


def test_figure_and_demo_outputs_are_never_overwritten(tmp_path, data_dir):
    """fig4/fig5 out_dirs are claimed like evaluate's; demo's --summary_json is
    never replaced; a demo stream longer than its split names both numbers."""
    for module, result_file in (("fig4", "fig4.json"), ("fig5", "fig5.json")):
        out = tmp_path / module
        out.mkdir()
        (out / result_file).write_text("earlier")
        result = _entry(module, f"--out_dir={out}")
        assert result.returncode == 1, result.stderr[-2000:]
        assert f"already holds {result_file} of an earlier run" in result.stderr
        assert len(result.stderr.strip().splitlines()) <= 3, result.stderr[-2000:]
        assert (out / result_file).read_text() == "earlier"
        assert not (out / ".lock").exists()
    summary = tmp_path / "demo.json"
    summary.write_text("earlier")
    result = _entry("demo", f"--summary_json={summary}", f"--data_dir={data_dir}")
    assert result.returncode == 1 and "exists (an earlier run's)" in result.stderr
    assert summary.read_text() == "earlier"
    result = _entry("demo", "--episode_length=10001", f"--data_dir={data_dir}")
    assert result.returncode == 1, result.stderr[-2000:]
    assert ("--episode_length=10001 examples is longer than the test split's 10000 "
            "examples") in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr[-2000:]


def test_start_up_mistakes_are_one_line(tmp_path):
    """A coordinator without a port, non-numeric clone sizes, and npz data with a
    NaN pixel or 0..255 floats: one message each, at the entry point."""
    checks = [
        (("meta_train", f"--workdir={tmp_path / 'a'}", "--coordinator_address=nohost",
          "--num_processes=2", "--process_id=0"), "--coordinator_address='nohost': give "
                                                  "HOST:PORT"),
        (("clone", f"--workdir={tmp_path / 'b'}", "--meta_test_layer_sizes=a,b"),
         "--meta_test_layer_sizes=a,b: give at least two positive sizes")]
    images = np.linspace(0, 1, 60 * 28 * 28, dtype=np.float32).reshape(60, 28, 28)
    labels = np.arange(60) % 10
    nan = images.copy()
    nan[3, 4, 5] = np.nan
    for name, x, message in (("nan", nan, r"images[3, 4, 5] is nan"),
                             ("255", images * 255, "look like 0..255 values")):
        path = tmp_path / f"{name}.npz"
        np.savez(path, x_train=x, y_train=labels, x_test=x, y_test=labels)
        checks.append((("evaluate", "--checkpoint=pretrained:mnist", f"--datasets=npz:{path}",
                        "--episode_length=20", "--seeds=1",
                        f"--out_dir={tmp_path / name}"), message))
    for (module, *args), message in checks:
        result = _entry(module, *args)
        assert result.returncode == 1, result.stderr[-2000:]
        assert message in result.stderr, result.stderr[-2000:]
        assert len(result.stderr.strip().splitlines()) <= 2, result.stderr[-2000:]


def test_sigterm_during_imports_exits_0(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "experiments.meta_train",
                             f"--workdir={tmp_path / 'run'}", *_TINY], cwd=repo, env=env,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # past the interpreter's start, within the imports of JAX
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 0, err[-2000:]
    assert "Stopped by SIGTERM outside a training step: nothing to save" in err
