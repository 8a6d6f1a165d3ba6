"""A run's workdir is never lost, never stuck and never lies (entry-point level).

Each test drives `python -m experiments.meta_train` as a user would; the
library pieces (lock, metrics file, checkpoint fallback) have unit tests in
test_workdir.py and test_metrics_writer.py.
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vsml_jax.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ("--dataset=synthetic", "--pool=4", "--synthetic_size=40", "--hidden_size=2",
        "--msg_size=2", "--micro_ticks=1", "--episode_length=5", "--batch_size=2",
        "--log_every=1")


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
    env.pop("XLA_FLAGS", None)
    return env


def _meta_train(*args, **kw):
    return subprocess.run([sys.executable, "-m", "experiments.meta_train", *args],
                          cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300, **kw)


def test_second_run_on_a_live_workdir_is_refused(tmp_path):
    workdir = str(tmp_path / "run")
    first = subprocess.Popen(
        [sys.executable, "-m", "experiments.meta_train", f"--workdir={workdir}", *TINY,
         "--num_steps=1000000", "--checkpoint_every=100"],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    # Until the first run has written its config.json (it holds the lock from
    # before its step compiles until it exits).
    while not os.path.exists(os.path.join(workdir, "config.json")):
        assert first.poll() is None and time.time() - t0 < 120
        time.sleep(0.05)
    assert os.path.exists(os.path.join(workdir, ".lock"))
    second = _meta_train(f"--workdir={workdir}", *TINY, "--hidden_size=3",
                         "--num_steps=2")
    # The first run is still live (it would take far longer than this test):
    # stop it as a preemption would; it saves and exits 0.
    assert first.poll() is None, "the first run ended before the second was refused"
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]
    assert second.returncode == 1
    assert f"PID {first.pid}" in second.stderr or str(first.pid) in second.stderr, \
        second.stderr
    # Nothing of the first run was overwritten by the refused one.
    assert json.load(open(os.path.join(workdir, "config.json")))["hidden_size"] == 2
    assert not os.path.exists(os.path.join(workdir, ".lock"))  # released at the end


def test_workdir_that_is_a_file_is_a_clear_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a folder")
    result = _meta_train(f"--workdir={path}", *TINY, "--num_steps=1")
    assert result.returncode == 1
    assert "is an existing file, not a folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_non_finite_data_is_rejected_naming_the_example(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.uniform(size=(30, 28, 28)).astype(np.float32)
    x_train[7, 3, 4] = np.nan
    y = rng.integers(0, 3, size=30)
    y[:3] = [0, 1, 2]
    np.savez(tmp_path / "bad.npz", x_train=x_train, y_train=y, x_test=x_train, y_test=y)
    result = _meta_train(f"--workdir={tmp_path / 'run'}", f"--dataset=npz:{tmp_path}/bad.npz",
                         "--pool=4", "--hidden_size=2", "--msg_size=2", "--micro_ticks=1",
                         "--episode_length=5", "--batch_size=2", "--num_steps=1")
    assert result.returncode == 1
    assert "nan" in result.stderr.lower() and "7" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_optimiser_settings_may_change_on_resume_and_are_recorded(tmp_path):
    workdir = str(tmp_path / "run")
    first = _meta_train(f"--workdir={workdir}", *TINY, "--num_steps=2",
                        "--checkpoint_every=1", "--lr=1e-2", "--eval_every=2",
                        "--eval_datasets=mnist", "--eval_length=100", "--eval_episodes=1")
    assert first.returncode == 0, first.stderr[-3000:]
    # What `tensorboard --logdir` shows: meta-loss, learning rate, meta-test accuracy.
    events = EventAccumulator(os.path.join(workdir, "tensorboard"))
    events.Reload()
    scalars = {t: [(e.step, e.value) for e in events.Scalars(t)]
               for t in events.Tags()["scalars"]}
    records = loop.read_metrics(workdir)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2]
    assert scalars["train/loss"][1][1] == pytest.approx(records[1]["loss"])
    assert scalars["train/lr"] == [(1, pytest.approx(1e-2)), (2, pytest.approx(1e-2))]
    assert [s for s, _ in scalars["eval/mnist/acc@100"]] == [2]
    # What the NaN message advises: a lower learning rate, same workdir.
    resumed = _meta_train(f"--workdir={workdir}", *TINY, "--num_steps=4",
                          "--checkpoint_every=1", "--lr=3e-3", "--clip_norm=0.5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["lr"] == 3e-3
    assert config["resume_changes"] == [{"step": 2, "changes": {
        "clip_norm": [1.0, 0.5], "eval_datasets": [["mnist"], ["mnist", "fashion_mnist"]],
        "eval_episodes": [1, 2], "eval_every": [2, 0], "eval_length": [100, 1000],
        "lr": [0.01, 0.003], "num_steps": [2, 4]}}]
    assert "changed settings" in resumed.stderr
    # The architecture may not change: the mismatch error stays.
    clash = _meta_train(f"--workdir={workdir}", *TINY, "--num_steps=4", "--msg_size=3")
    assert clash.returncode == 1 and "msg_size" in clash.stderr


def test_damaged_newest_checkpoint_and_torn_metrics_line_resume(tmp_path):
    flags = (*TINY, "--num_steps=6", "--checkpoint_every=2")
    straight, damaged = str(tmp_path / "straight"), str(tmp_path / "damaged")
    assert _meta_train(f"--workdir={straight}", *flags).returncode == 0
    first = _meta_train(f"--workdir={damaged}", *TINY, "--num_steps=4",
                        "--checkpoint_every=2")
    assert first.returncode == 0, first.stderr[-3000:]
    # The newest step (4) loses its data; a crash tore the last metrics line.
    step4 = os.path.join(damaged, "checkpoints", "4")
    shutil.rmtree(step4)
    os.makedirs(step4)
    with open(os.path.join(damaged, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "spl')
    resumed = _meta_train(f"--workdir={damaged}", *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 4" in resumed.stderr and "metrics.jsonl" in resumed.stderr
    assert os.path.isdir(os.path.join(damaged, "checkpoints_damaged"))
    a = open(os.path.join(straight, "params.msgpack"), "rb").read()
    b = open(os.path.join(damaged, "params.msgpack"), "rb").read()
    assert a == b  # resumed from step 2, bit-identical to the straight run
    assert loop.read_metrics(straight) == loop.read_metrics(damaged)


def test_nan_stop_gives_a_command_that_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    # An absurd learning rate: the meta-loss turns NaN at step 4 (measured).
    stopped = _meta_train(f"--workdir={workdir}", *TINY, "--num_steps=6",
                          "--checkpoint_every=1", "--lr=1e38", "--clip_norm=0")
    assert stopped.returncode == 1
    assert "loss is nan" in stopped.stderr and "Traceback" not in stopped.stderr
    command = stopped.stderr.split("`")[1]  # the command the message gives
    assert "--lr=0.001" in command and "--clip_norm=1" in command
    # The checkpoints hold weights that already blew up (their next loss is
    # NaN or far above the run's), so the command starts again from step 0.
    assert "--restore_step=0" in command, stopped.stderr[-2000:]
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "experiments.meta_train"]
    again = _meta_train(*args[3:])
    assert again.returncode == 0, again.stderr[-2000:]  # the printed command finishes
    assert "moved the checkpoint of step 3" in again.stderr
    assert os.path.isdir(os.path.join(workdir, "checkpoints_rolled_back"))
    assert [r["step"] for r in loop.read_metrics(workdir)
            if r["split"] == "train"] == list(range(1, 7))
