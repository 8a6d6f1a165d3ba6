"""experiments.fig5: the cloned-backprop figure regenerates with one command."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fig5_entry_point_smoke(tmp_path, data_dir):
    # MNIST and a 26-class set of 32x32 colour images: the clone and SGD are
    # built for each data set's class count, the images made grey and resized.
    rng = np.random.default_rng(0)
    letters = str(tmp_path / "letters.npz")
    np.savez(letters, x_train=rng.random((52, 32, 32, 3), np.float32),
             y_train=np.arange(52) % 26, x_test=rng.random((60, 32, 32, 3), np.float32),
             y_test=np.arange(60) % 26)
    datasets = ("mnist", f"npz:{letters}")
    out_dir = tmp_path / "fig5"
    cmd = [sys.executable, "-m", "experiments.fig5", "--checkpoint=pretrained:backprop_clone",
           f"--datasets={','.join(datasets)}", "--download",
           "--pool=4", "--steps=20", "--eval_every=10", "--test_examples=50", "--seeds=2",
           f"--data_dir={data_dir}", f"--out_dir={out_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Progress lines with an ETA; at the end a short table and where the files went.
    assert re.search(r"mnist cloned backprop: .* 10/20 steps .* \| ETA \dh\d\dm\d\ds",
                     proc.stderr), proc.stderr[-3000:]
    assert "== mnist: test accuracy on 50 test images after 20 steps" in proc.stdout
    assert f"wrote {out_dir / 'fig5.json'} (curves per seed), {out_dir / 'fig5.png'} in " \
        in proc.stdout, proc.stdout
    assert len(proc.stdout.splitlines()) < 15, proc.stdout  # no JSON dump
    result = json.loads((out_dir / "fig5.json").read_text())
    assert result["flags"]["stream_batch"] == 0 and result["seeds"] == [0, 1]
    assert result["flags"]["download"] is True
    for ds, classes in zip(datasets, (10, 26)):
        # The SGD baseline runs at the clone's rate: clone.lr 0.01 x error_scale 0.25.
        assert result["methods"][ds]["sgd_lr"] == result["methods"][ds]["clone_rate"] == 0.0025
        assert result["methods"][ds]["num_classes"] == classes
        assert result["methods"][ds]["input_size"] == 49
        assert set(result["summary"][ds]) == {"cloned backprop", "SGD (lr 0.0025)"}
        for method, curve in result["curves"][ds].items():
            assert curve["steps"] == [0, 10, 20]
            acc = np.asarray(curve["test_acc"])
            assert acc.shape == (2, 3) and ((0 <= acc) & (acc <= 1)).all()
            s = result["summary"][ds][method]
            assert s["final_test_acc_mean"] == pytest.approx(np.mean(acc[:, -1]))
            assert s["final_test_acc_std"] == pytest.approx(np.std(acc[:, -1]))
    # What was read for each data set.
    assert result["data"]["mnist"]["train"]["source"] == os.path.abspath(
        os.path.join(data_dir, "mnist"))
    assert result["data"][datasets[1]]["test"] == {
        "name": datasets[1], "source": letters, "num_classes": 26, "num_examples": 60,
        "input_size": 49}
    assert (out_dir / "fig5.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
