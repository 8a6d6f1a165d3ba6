"""`python -m experiments.demo`, run as a user runs it: output format and learning.

The thresholds come from measured runs of the shipped learner on 28x28 MNIST
test streams (cumulative online accuracy after 300 examples: 0.700 for seed 0,
0.67 to 0.73 over seeds 0-9; the untrained learner 0.13, chance 0.1).
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW = re.compile(r"^\s*(\d+)((?:\s+\d\.\d{3})+)\s*$")


def run_demo(data_dir, *args, timeout=300):
    env = dict(os.environ, VSML_DATA_DIR=data_dir)
    return subprocess.run([sys.executable, "-m", "experiments.demo", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def table(stdout):
    """(column titles, {examples: [accuracy per column]}) of the printed table."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("examples"))
    titles = re.split(r"\s{2,}", lines[head].strip())[1:]
    rows = {}
    for line in lines[head + 1:]:
        m = ROW.match(line)
        if not m:
            break
        rows[int(m.group(1))] = [float(a) for a in m.group(2).split()]
    return titles, rows


def check_ok(proc):
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout}\n{proc.stderr}"
    assert "Unable to initialize backend" not in proc.stdout + proc.stderr


def test_demo_shipped_learner_learns(data_dir):
    proc = run_demo(data_dir, "--episode_length=300")
    check_ok(proc)
    out = proc.stdout
    titles, rows = table(out)
    # Adam's rate is swept on train-split streams (never the reported stream).
    sweep = re.search(r"Online Adam: lr ([\d.e-]+), the best of a sweep on 2 train-split "
                      r"streams \((.*); [\d.]+ s\)\.", out)
    assert sweep, out
    assert len(sweep.group(2).split(", ")) == 4, out
    assert titles == ["pretrained:mnist", f"online Adam (lr {sweep.group(1)})",
                      "untrained VS-ML"], out
    assert sorted(rows) == [100, 200, 300], out
    assert all(len(r) == 3 and all(0 <= a <= 1 for a in r) for r in rows.values()), out
    learned, adam, untrained = rows[300]
    assert learned > 0.5, out      # measured 0.700 (seed 0)
    assert untrained < 0.3, out    # measured 0.133: without meta-training nothing is learned
    assert learned > adam, out     # measured 0.583 for Adam
    assert re.search(r"Stream: 300 mnist test images \(28x28, 784 inputs\), seed 0", out), out
    assert re.search(r"Compiled \d+ programs in [\d.]+ s\.", out), out
    assert re.search(r"pretrained:mnist: 300 examples in [\d.]+ s \([\d,]+ examples/s\)", out)
    assert re.search(r"Total: compile [\d.]+ s \+ run [\d.]+ s on \w+\.", out), out


def test_demo_other_dataset_uneven_chunks(data_dir):
    proc = run_demo(data_dir, "--dataset=fashion_mnist", "--episode_length=150",
                    "--compare=adam", "--adam_lr=1e-3")
    check_ok(proc)
    titles, rows = table(proc.stdout)
    assert "Online Adam: lr 0.001 (--adam_lr)." in proc.stdout, proc.stdout
    assert titles == ["pretrained:mnist", "online Adam (lr 0.001)"], proc.stdout
    assert sorted(rows) == [100, 150], proc.stdout
    assert rows[150][0] > 0.35, proc.stdout  # measured 0.540 (never meta-trained on it)


def test_demo_unknown_checkpoint_is_a_usage_error(data_dir):
    proc = run_demo(data_dir, "--checkpoint=pretrained:no_such_learner", timeout=120)
    assert proc.returncode != 0
    assert "unknown pretrained learner 'no_such_learner'" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
