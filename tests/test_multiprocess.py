"""The pod code path, for real: several processes joined by jax.distributed.

Each test starts `python -m experiments.meta_train` as N processes on
127.0.0.1 (a free port, gloo collectives between CPU devices, JAX_NUM_CPU_DEVICES
devices each), exactly as a user would on N hosts, and compares the learner
they write with a single process over the same number of devices.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vsml_jax.training import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny run: synthetic data, 49 inputs, 2x2 cells' state; long enough (in
# steps) that a process can be killed in the middle of it.
TINY = ("--dataset=synthetic", "--pool=4", "--synthetic_size=64", "--hidden_size=2",
        "--msg_size=2", "--micro_ticks=1", "--episode_length=5", "--log_every=20")
ADAM = TINY + ("--meta_optimizer=adam", "--batch_size=8", "--lr=3e-2", "--num_steps=40",
               "--checkpoint_every=10")
ES = TINY + ("--meta_optimizer=open_es", "--popsize=8", "--batch_size=2", "--num_steps=4",
             "--checkpoint_every=2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, flags, processes: int, devices: int):
    """Starts the job: `processes` processes with `devices` CPU devices each."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    os.makedirs(workdir, exist_ok=True)
    procs = []
    for i in range(processes):
        cluster = ([f"--coordinator_address=127.0.0.1:{port}",
                    f"--num_processes={processes}", f"--process_id={i}",
                    "--heartbeat_timeout=10"] if processes > 1 else [])
        log = open(os.path.join(os.path.dirname(workdir),
                                f"{os.path.basename(workdir)}.p{i}.log"), "a")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "experiments.meta_train", f"--workdir={workdir}",
             *flags, *cluster], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _logs(workdir, processes, tail=3000):
    """The processes' output (the last `tail` characters of each; None: all)."""
    out = []
    for i in range(processes):
        with open(os.path.join(os.path.dirname(workdir),
                               f"{os.path.basename(workdir)}.p{i}.log")) as f:
            out.append(f.read()[-tail if tail else 0:])
    return "\n---\n".join(out)


def _finish(workdir, procs, timeout=240):
    codes = [p.wait(timeout=timeout) for p in procs]
    assert codes == [0] * len(procs), _logs(workdir, len(procs))


def _run(workdir, flags, processes, devices):
    _finish(str(workdir), _start(str(workdir), flags, processes, devices))


def _params(workdir):
    params, _, info = checkpointing.load_vsml_learner(str(workdir))
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)], info


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def _latest_checkpoint(workdir):
    folder = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
    return max(steps, default=0)


def _wait_for_checkpoint(workdir, step, procs, timeout=120):
    t0 = time.time()
    while _latest_checkpoint(workdir) < step:
        assert all(p.poll() is None for p in procs), _logs(workdir, len(procs))
        assert time.time() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def adam_reference(tmp_path_factory):
    """The Adam run on 1 process x 4 devices and on 2 processes x 2 devices."""
    root = tmp_path_factory.mktemp("adam")
    single, multi = root / "single", root / "multi"
    # Both jobs at once: the 2-core machine overlaps their start-up.
    jobs = [(single, _start(str(single), ADAM, 1, 4)),
            (multi, _start(str(multi), ADAM, 2, 2))]
    for workdir, procs in jobs:
        _finish(str(workdir), procs)
    return root, _params(single)[0], _params(multi)[0]


def test_two_processes_equal_one_process_adam(adam_reference):
    root, single, multi = adam_reference
    diff = _max_diff(single, multi)
    print(f"Adam BPTT, 2 processes x 2 devices vs 1 x 4: max |diff| = {diff:.3g}")
    for a, b in zip(single, multi):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    # Only process 0 writes: one metrics record per step, one learner.
    records = [json.loads(l) for l in open(root / "multi" / "metrics.jsonl")]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 41))
    info = json.load(open(root / "multi" / "learner.json"))
    assert info["meta_training"]["finished"] is True
    assert os.path.isdir(root / "multi" / "tensorboard")


def test_two_processes_equal_one_process_evolution(tmp_path):
    jobs = [(tmp_path / "single", _start(str(tmp_path / "single"), ES, 1, 4)),
            (tmp_path / "multi", _start(str(tmp_path / "multi"), ES, 2, 2))]
    for workdir, procs in jobs:
        _finish(str(workdir), procs)
    single, multi = _params(tmp_path / "single")[0], _params(tmp_path / "multi")[0]
    print(f"OpenES, 2 processes x 2 devices vs 1 x 4: max |diff| = "
          f"{_max_diff(single, multi):.3g}")
    for a, b in zip(single, multi):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_killed_process_stops_the_job_and_a_restart_resumes(adam_reference, tmp_path):
    root, _, uninterrupted = adam_reference
    workdir = str(tmp_path / "killed")
    procs = _start(workdir, ADAM, 2, 2)
    _wait_for_checkpoint(workdir, 10, procs)
    procs[1].kill()  # kill -9: no chance to save or say goodbye
    t0 = time.time()
    code = procs[0].wait(timeout=90)  # bounded: the heartbeat timeout is 10 s
    waited = time.time() - t0
    assert code != 0
    assert "another task died" in _logs(workdir, 2, tail=None)
    print(f"survivor stopped {waited:.1f} s after the kill, exit code {code}")
    assert _latest_checkpoint(workdir) < 40
    _finish(workdir, _start(workdir, ADAM, 2, 2))  # the same command again
    resumed, info = _params(workdir)
    for a, b in zip(uninterrupted, resumed):
        np.testing.assert_array_equal(a, b)
    assert info["meta_training"]["steps"] == 40


def test_sigterm_saves_at_one_step_and_resume_is_exact(adam_reference, tmp_path):
    root, _, uninterrupted = adam_reference
    workdir = str(tmp_path / "preempted")
    procs = _start(workdir, ADAM, 2, 2)
    _wait_for_checkpoint(workdir, 10, procs)
    procs[1].send_signal(signal.SIGTERM)  # what a preempted VM's process gets
    _finish(workdir, procs, timeout=90)    # both save and exit cleanly
    stopped = _latest_checkpoint(workdir)
    assert 10 <= stopped < 40, stopped
    info = json.load(open(os.path.join(workdir, "learner.json")))
    assert info["meta_training"]["finished"] is False
    assert "Preempted" in _logs(workdir, 2, tail=None)
    _finish(workdir, _start(workdir, ADAM, 2, 2))
    resumed, info = _params(workdir)
    for a, b in zip(uninterrupted, resumed):
        np.testing.assert_array_equal(a, b)
    assert info["meta_training"]["finished"] is True


# ------------------------------------------------------------ start-up faults
def test_port_in_use_is_one_line_on_process_0(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        r = subprocess.run(
            [sys.executable, "-m", "experiments.meta_train", f"--workdir={tmp_path / 'w'}",
             *ADAM, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             "--process_id=0"], cwd=REPO, env=env, capture_output=True, text=True,
            timeout=120)
    assert r.returncode == 1, r.stderr
    assert f"cannot listen on port {port}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_waiting_for_peers_is_reported_and_sigterm_exits_0(tmp_path):
    """Only process 0 of 2 is started: it says it waits, and SIGTERM ends it with 0."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.Popen(
        [sys.executable, "-m", "experiments.meta_train", f"--workdir={tmp_path / 'w'}",
         *ADAM, f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2",
         "--process_id=0"], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    lines = []
    t0 = time.time()
    while time.time() - t0 < 120:
        line = p.stdout.readline()
        lines.append(line)
        if "waiting" in line and "for all processes to join" in line:
            break
    else:
        p.kill()
        pytest.fail("no waiting notice:\n" + "".join(lines))
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 0, "".join(lines) + out
    assert "Stopped by SIGTERM while waiting for the other processes" in out
