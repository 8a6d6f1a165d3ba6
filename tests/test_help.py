"""`python -m experiments.X --help` of every entry point: exits 0, lists the
flags a user needs most (the shared groups of experiments/common.py and the
entry point's own), and stays short (the libraries' flags only under
--helpfull).

All entry points run at once as subprocesses (each spends its ~2 s importing
JAX), so the file takes a few seconds.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# entry point -> flags its --help must list. The shared groups apply where the
# entry point defines them: a run folder and schedule for the trainers, data
# flags for whatever reads images, the cluster flags for what can run as a
# multi-process job.
RUN = ["--workdir", "--num_steps", "--seed", "--checkpoint_every", "--eval_every",
       "--coordinator_address", "--num_processes", "--process_id"]
DATA = ["--data_dir", "--[no]download"]
EXPECTED = {
    "meta_train": RUN + DATA + ["--dataset", "--log_every", "--init_checkpoint"],
    "clone": RUN + ["--stage"],
    "evaluate": DATA + ["--datasets", "--checkpoint", "--seeds", "--baselines",
                        "--episode_length", "--out_dir", "--label"],
    "demo": DATA + ["--dataset", "--checkpoint", "--seed", "--episode_length",
                    "--adam_lrs"],
    "fig4": ["--checkpoint", "--out_dir"],
    "fig5": DATA + ["--datasets", "--checkpoint", "--seeds", "--eval_every",
                    "--out_dir"],
    "plan": RUN + DATA + ["--dataset", "--target"],
    "benchmark": ["--sections", "--out", "--markdown", "--[no]quick"],
}
# Flags of libraries (absl.testing, chex, jax) that must stay under --helpfull.
NOT_EXPECTED = ["--test_srcdir", "--chex_n_cpu_devices"]


def _entry_points():
    """Every `python -m experiments.X` that has a main: the modules and packages
    of experiments/ other than the shared ones."""
    names = []
    for entry in sorted(os.listdir(os.path.join(ROOT, "experiments"))):
        path = os.path.join(ROOT, "experiments", entry)
        if entry.endswith(".py") and entry not in ("__init__.py", "common.py"):
            with open(path) as f:
                if "__main__" in f.read():
                    names.append(entry[:-3])
        elif os.path.isfile(os.path.join(path, "__main__.py")):
            names.append(entry)
    return names


@pytest.fixture(scope="module")
def helps():
    """entry point -> (exit status, stdout + stderr) of `--help`, run in parallel."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = {name: subprocess.Popen([sys.executable, "-m", f"experiments.{name}", "--help"],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
             for name in _entry_points()}
    return {name: (p.wait(timeout=120), p.stdout.read()) for name, p in procs.items()}


def test_every_entry_point_is_checked():
    assert sorted(_entry_points()) == sorted(EXPECTED), (
        "an entry point was added or removed under experiments/: list the flags its "
        "--help must show in EXPECTED")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_help_lists_the_key_flags(helps, name):
    status, text = helps[name]
    assert status == 0, f"experiments.{name} --help exited {status}:\n{text[-2000:]}"
    listed = {line.split(":", 1)[0].strip() for line in text.splitlines()
              if line.startswith("  --")}
    missing = [flag for flag in EXPECTED[name] if flag not in listed]
    assert not missing, f"experiments.{name} --help does not list {missing}:\n{text}"
    leaked = [flag for flag in NOT_EXPECTED if flag in text]
    assert not leaked, f"experiments.{name} --help lists library flags {leaked}"
    assert "--helpfull" in text  # says where the rest is
    assert len(text.splitlines()) < 250, f"experiments.{name} --help is not short"


def test_helpfull_still_lists_everything_and_exits_0():
    out = subprocess.run([sys.executable, "-m", "experiments.fig4", "--helpfull"], cwd=ROOT,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--grid", "--test_srcdir", "--chex_n_cpu_devices", "--flagfile"):
        assert flag in out.stdout, f"--helpfull does not list {flag}"


def test_usage_error_points_at_help():
    out = subprocess.run([sys.executable, "-m", "experiments.demo", "unexpected"],
                         cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.rstrip().endswith("(--help lists the flags.)"), out.stderr
