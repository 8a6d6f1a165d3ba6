"""Meta-test machinery: streams, metrics, learner files and the evaluate entry point."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import vsml_jax
from vsml_jax import evaluation
from vsml_jax.baselines import meta_rnn, online_gd
from vsml_jax.data import Dataset
from vsml_jax.learners import vsml_learner
from vsml_jax.pretrained import LearnerFileError, available, load_learner, save_learner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = vsml_jax.VSMLConfig(layer_sizes=(8, 3), hidden_size=4, msg_size=4, micro_ticks=1)


def toy_dataset(n=40, d=8, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return Dataset(images=jnp.asarray(rng.standard_normal((n, d)), jnp.float32),
                   labels=jnp.asarray(rng.integers(0, c, n), jnp.int32), num_classes=c,
                   name="toy")


def write_learner_files(directory, name, config, params, flags):
    """The portable format, written by hand: flax bytes + JSON."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "params.msgpack"), "wb") as f:
        f.write(serialization.to_bytes(params))
    with open(os.path.join(directory, "learner.json"), "w") as f:
        json.dump({"learner": name, "config": config, "flags": flags}, f)


def test_metrics_by_hand():
    correct = np.array([[1, 0, 1, 1], [0, 0, 0, 1]], np.float32)
    loss = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 4.0]])
    out = vsml_jax.StepOutput(logits=None, loss=loss, correct=correct)
    np.testing.assert_allclose(evaluation.cumulative_accuracy(correct),
                               [[1, .5, 2 / 3, .75], [0, 0, 0, .25]])
    np.testing.assert_allclose(evaluation.window_accuracy(correct, window=2),
                               [[1, .5, .5, 1], [0, 0, 0, .5]])
    m = evaluation.online_metrics(out, checkpoints=(2, 100), window=2)
    assert sorted(m) == ["cum_acc@2", "cum_acc@4", "final_window_acc", "mean_loss"]
    np.testing.assert_allclose(m["cum_acc@2"], [.5, 0])
    np.testing.assert_allclose(m["final_window_acc"], [1, .5])
    np.testing.assert_allclose(m["mean_loss"], [2.5, 1.0])
    s = evaluation.summarize(m)
    assert s["cum_acc@4"] == {"mean": 0.5, "std": 0.25, "per_seed": [0.75, 0.25]}
    # K examples per step: a step's accuracy is the fraction of its K correct.
    np.testing.assert_allclose(evaluation.step_accuracy(np.ones((1, 3, 4)) * [1, 0, 0, 1]),
                               [[.5, .5, .5]])


def test_streams_are_seeded_and_shared():
    data = toy_dataset()
    a = evaluation.make_streams(data, [0, 1], 10)
    b = evaluation.make_streams(data, [0, 1], 10)
    c = evaluation.make_streams(data, [1, 5], 10)
    np.testing.assert_array_equal(a.indices, b.indices)       # same flags, same streams
    np.testing.assert_array_equal(a.indices[1], c.indices[0])  # a seed's stream is its own
    assert not np.array_equal(a.indices[0], a.indices[1])
    assert len(set(np.asarray(a.indices[0]).tolist())) == 10   # no repeats while T <= N
    x, y = a.materialize()
    assert x.shape == (2, 10, 8) and y.shape == (2, 10, 3)
    np.testing.assert_array_equal(x[0, 3], data.images[a.indices[0, 3]])
    assert int(jnp.argmax(y[1, 4])) == int(data.labels[a.indices[1, 4]])
    wide = evaluation.make_streams(data, [0], 20, stream_batch=4)  # 80 > 40: with replacement
    assert wide.indices.shape == (1, 20, 4)
    assert wide.slice(2, 5)[0].shape == (1, 3, 4, 8)


def test_evaluate_chunked_and_batch_averaged():
    data, seeds = toy_dataset(), [3, 4]
    streams = evaluation.make_streams(data, seeds, 6)
    adam = online_gd.online_gd_learner(8, 3)
    whole = evaluation.evaluate_learner(adam, None, streams, seeds)
    lines = []
    pieces = evaluation.evaluate_learner(adam, None, streams, seeds, chunk_size=3,
                                         log=lines.append)
    assert whole.logits.shape == (2, 6, 3)
    # Running in pieces (carrying the state) changes nothing.
    np.testing.assert_allclose(whole.logits, pieces.logits, rtol=1e-6, atol=1e-6)
    assert len(lines) == 2 and "6/6 steps" in lines[-1]
    # The same streams as arrays give the same result.
    again = evaluation.evaluate_learner(adam, None, streams.materialize(), seeds)
    np.testing.assert_array_equal(whole.logits, again.logits)

    # K = 4 copies of a VS-ML learner with averaged states, or a minibatch of 4.
    wide = evaluation.make_streams(data, seeds, 3, stream_batch=4)
    vsml = vsml_learner(TINY)
    res = evaluation.evaluate_method(vsml, vsml.init_params(jax.random.key(0)), wide, seeds,
                                     stream_batch=4, checkpoints=(2,), window=2)
    assert set(res.summary) == {"cum_acc@2", "cum_acc@3", "final_window_acc", "mean_loss"}
    assert res.cum_acc.shape == (2, 3)
    out = evaluation.evaluate_learner(adam, None, wide, seeds, stream_batch=4)
    assert out.correct.shape == (2, 3, 4)
    with pytest.raises(ValueError, match="does not define batch-averaged streams"):
        evaluation.evaluate_learner(meta_rnn.meta_rnn_learner(8, 3, 4), None, wide, seeds,
                                    stream_batch=4)


def test_learner_files_round_trip(tmp_path):
    learner = vsml_learner(TINY)
    params = learner.init_params(jax.random.key(1))
    config = dict(vars(TINY), layer_sizes=list(TINY.layer_sizes))
    write_learner_files(tmp_path / "vsml", "vsml", config, params, {"pool": 4})
    loaded = load_learner(str(tmp_path / "vsml"))
    assert loaded.learner.name == "vsml" and loaded.learner.config == TINY and loaded.pool == 4
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded.params)):
        np.testing.assert_array_equal(a, b)
    # VS-ML runs at another input size with the same V_M.
    wide = load_learner(str(tmp_path / "vsml"), input_size=32)
    assert wide.learner.config.layer_sizes == (32, 3) and wide.params.cfg.input_size == 32
    np.testing.assert_array_equal(wide.params.cells.w_h, params.cells.w_h)

    rnn = meta_rnn.meta_rnn_learner(8, 3, hidden_size=4)
    rnn_params = rnn.init_params(jax.random.key(2))
    save_learner(str(tmp_path / "rnn"), rnn, rnn_params, {"pool": 4})
    back = load_learner(str(tmp_path / "rnn"))
    assert back.learner.config == rnn.config
    for key in rnn_params:
        np.testing.assert_array_equal(back.params[key], rnn_params[key])
    with pytest.raises(LearnerFileError, match="cannot run on 32"):
        load_learner(str(tmp_path / "rnn"), input_size=32)

    # Broken files give errors that name the problem.
    write_learner_files(tmp_path / "bad", "vsml", dict(config, hidden_size=8), params, {})
    with pytest.raises(LearnerFileError, match="do not match"):
        load_learner(str(tmp_path / "bad"))
    os.remove(tmp_path / "bad" / "params.msgpack")
    with pytest.raises(LearnerFileError, match="lacks params.msgpack"):
        load_learner(str(tmp_path / "bad"))
    write_learner_files(tmp_path / "odd", "vsml", dict(config, colour="red"), params, {})
    with pytest.raises(LearnerFileError, match="colour"):
        load_learner(str(tmp_path / "odd"))


def test_format_tag_matches_the_writer(tmp_path):
    from vsml_jax import pretrained
    from vsml_jax.training import checkpointing
    assert pretrained.LEARNER_FORMAT == checkpointing.LEARNER_FORMAT
    with open(tmp_path / "learner.json", "w") as f:
        json.dump({"format": "other/9", "learner": "vsml", "config": {}}, f)
    (tmp_path / "params.msgpack").write_bytes(b"")
    with pytest.raises(LearnerFileError, match="other/9"):
        load_learner(str(tmp_path))


def test_unknown_pretrained_name_lists_the_available_ones():
    with pytest.raises(LearnerFileError) as e:
        load_learner("pretrained:doesnotexist")
    msg = str(e.value)
    assert "doesnotexist" in msg and "available:" in msg
    for name in available():
        assert name in msg


def test_evaluate_entry_point_end_to_end(tmp_path, data_dir):
    cfg = vsml_jax.VSMLConfig(layer_sizes=(49, 10), hidden_size=4, msg_size=4, micro_ticks=1)
    learner = vsml_learner(cfg)
    save_learner(str(tmp_path / "ckpt"), learner, learner.init_params(jax.random.key(0)),
                 {"pool": 4})
    # A second VS-ML learner as a baseline: it must not replace the first.
    other = vsml_learner(cfg.replace(hidden_size=8))
    save_learner(str(tmp_path / "ckpt2"), other, other.init_params(jax.random.key(1)),
                 {"pool": 4})
    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "experiments.evaluate", f"--checkpoint={tmp_path / 'ckpt'}",
           "--datasets=mnist,fashion_mnist", "--episode_length=50", "--seeds=2",
           f"--baselines=adam,vsml:{tmp_path / 'ckpt2'},wide=vsml:{tmp_path / 'ckpt2'},"
           "nearest_mean,nearest_neighbour",
           "--lrs=1e-3,1e-2", "--sweep_seeds=2",
           "--chunk_size=25",
           f"--data_dir={data_dir}", f"--out_dir={out_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== mnist" in proc.stdout and "adam" in proc.stdout

    summary = json.loads((out_dir / "summary.json").read_text())
    settings = summary["settings"]
    assert settings["episode_length"] == 50 and settings["seeds"] == [0, 1]
    assert settings["pool"] == 4 and settings["input_size"] == 49
    assert not set(settings["lr_sweep"]["seeds"]) & set(settings["seeds"])
    curves = np.load(out_dir / "curves.npz")
    for dataset in ("mnist", "fashion_mnist"):
        res = summary["results"][dataset]
        # The checkpoint is named by its folder, a KIND:PATH baseline by its kind.
        assert set(res) == {"ckpt", "vsml", "wide", "adam", "nearest_mean",
                            "nearest_neighbour"}
        assert res["wide"]["metrics"] == res["vsml"]["metrics"]  # same learner
        assert res["ckpt"]["config"]["hidden_size"] == 4
        assert res["vsml"]["config"]["hidden_size"] == 8
        for method, r in res.items():
            assert set(r["metrics"]) == {"cum_acc@50", "final_window_acc", "mean_loss"}
            for v in r["metrics"].values():
                assert set(v) == {"mean", "std", "per_seed"} and len(v["per_seed"]) == 2
            # The JSON agrees with the stored curves.
            cum = curves[f"{dataset}/{method}/cum_acc"]
            assert cum.shape == (2, 50)
            assert r["metrics"]["cum_acc@50"]["mean"] == pytest.approx(cum[:, -1].mean(),
                                                                      abs=1e-6)
            assert r["counts"]["learned_variables"] > 0
        assert res["ckpt"]["counts"]["meta_variables"] == vsml_jax.count_meta_variables(cfg)
        assert res["ckpt"]["config"]["layer_sizes"] == [49, 10]
        assert res["adam"]["lr"] in (1e-3, 1e-2)
        assert [row["lr"] for row in res["adam"]["lr_sweep"]] == [1e-3, 1e-2]
        # 1-NN holds the whole stream: 50 examples of 49 pooled pixels.
        assert res["nearest_neighbour"]["counts"]["state_size"] >= 50 * 49
    # Figures are named after the learner and the data sets.
    assert summary["files"]["figure"] == "ckpt_on_mnist_fashion_mnist.png"
    assert summary["files"]["window_figure"] == "ckpt_on_mnist_fashion_mnist_window_accuracy.png"
    for png in (summary["files"]["figure"], summary["files"]["window_figure"]):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------ held-out tests
def _predict_vs_unroll(learner, params, x, y, state):
    """([(predict on x_t from the state before step t, unroll's logits at t)], final state)."""
    unroll, predict = jax.jit(learner.unroll), jax.jit(learner.predict)
    pairs = []
    for t in range(x.shape[0]):
        before = predict(params, state, x)  # all inputs: row t is the one unroll sees
        state, out = unroll(params, state, (x[t:t + 1], y[t:t + 1]))
        pairs.append((np.asarray(before[t]), np.asarray(out.logits[0])))
    return pairs, state


@pytest.mark.parametrize("kind", ["adam", "tanh_sgd", "meta_rnn", "hebbian", "vsml",
                                  "vsml_stacked"])
def test_predict_is_the_prediction_unroll_makes(kind):
    from vsml_jax.baselines import hebbian
    data = toy_dataset(n=5)
    x = data.images
    y = jax.nn.one_hot(data.labels, 3)
    learner = {
        "adam": lambda: online_gd.online_gd_learner(8, 3, learning_rate=0.1),
        "tanh_sgd": lambda: online_gd.tanh_linear_learner(8, 3, learning_rate=0.5),
        "meta_rnn": lambda: meta_rnn.meta_rnn_learner(8, 3, hidden_size=4),
        "hebbian": lambda: hebbian.hebbian_learner(8, 3, rule_hidden=4),
        # predict_then_learn: a step's prediction is a pass with zero error, as predict's.
        "vsml": lambda: vsml_learner(TINY.replace(protocol="predict_then_learn")),
        # Two layers: the prediction tick reads no backward messages at all.
        "vsml_stacked": lambda: vsml_learner(TINY.replace(
            layer_sizes=(8, 5, 3), protocol="predict_then_backprop", slot_messages=True)),
    }[kind]()
    params = learner.init_params(jax.random.key(0))
    state = learner.init_state(jax.random.key(1))
    pairs, final = _predict_vs_unroll(learner, params, x, y, state)
    for before, logits in pairs:
        np.testing.assert_allclose(before, logits, rtol=1e-5, atol=1e-6)
    # The state learned, so its predictions moved (the comparison above is not vacuous).
    first, last = learner.predict(params, state, x), learner.predict(params, final, x)
    assert first.shape == (5, 3) and not np.allclose(first, last)


def test_vsml_predict_on_batch_averaged_state_uses_one_copy():
    learner = vsml_learner(TINY)
    params = learner.init_params(jax.random.key(0))
    state = learner.init_state(jax.random.key(1))
    x = toy_dataset(n=4).images
    wide = vsml_jax.init_state_for_streams(state, 3)
    np.testing.assert_allclose(learner.predict(params, wide, x),
                               learner.predict(params, state, x), rtol=1e-6, atol=1e-6)


def test_held_out_curve_in_pieces():
    data, test, seeds = toy_dataset(), toy_dataset(n=30, seed=1), [3, 4]
    streams = evaluation.make_streams(data, seeds, 7)
    adam = online_gd.online_gd_learner(8, 3, learning_rate=0.05)
    whole = evaluation.evaluate_learner(adam, None, streams, seeds)
    lines = []
    run = evaluation.evaluate_learner(adam, None, streams, seeds, chunk_size=2, log=lines.append,
                                      held_out=(test.images, test.labels), held_out_every=3)
    # Testing between pieces changes nothing online.
    for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(run.out)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(run.test_steps, [0, 3, 6, 7])
    assert run.test_acc.shape == (2, 4)
    assert any("held-out accuracy" in line for line in lines)
    # Step 0 is the initial network of each seed on the held-out set.
    for i, s in enumerate(seeds):
        net = adam.init_state(evaluation.init_key(s)).net
        pred = np.argmax(online_gd.apply_net(adam.config, net, test.images), -1)
        assert run.test_acc[i, 0] == pytest.approx(np.mean(pred == np.asarray(test.labels)))
    # One-hot labels give the same curve; at lr 0 the network never changes.
    frozen = online_gd.tanh_linear_learner(8, 3, learning_rate=0.0)
    one_hot = (test.images, jax.nn.one_hot(test.labels, 3))
    res = evaluation.evaluate_method(frozen, None, streams, seeds, checkpoints=(3,), window=2,
                                     held_out=one_hot, held_out_every=3)
    np.testing.assert_allclose(res.test_acc, res.test_acc[:, :1] * np.ones((1, 4)))
    assert {"test_acc@0", "test_acc@3", "test_acc@6", "test_acc@7",
            "test_acc_final"} <= set(res.summary)
    assert res.summary["test_acc_final"]["per_seed"] == pytest.approx(res.test_acc[:, -1])
    moving = evaluation.evaluate_method(online_gd.tanh_linear_learner(8, 3, learning_rate=1.0),
                                        None, streams, seeds, held_out=one_hot,
                                        held_out_every=3)
    assert not np.allclose(moving.test_acc, moving.test_acc[:, :1])


    blind = dataclasses.replace(adam, predict=None)
    with pytest.raises(ValueError, match="'adam' defines no `predict`"):
        evaluation.evaluate_learner(blind, None, streams, seeds,
                                    held_out=(test.images, test.labels))
    with pytest.raises(ValueError, match=r"inputs \[N, 8\]"):
        evaluation.evaluate_learner(adam, None, streams, seeds,
                                    held_out=(test.images[:, :5], test.labels))


def write_clone_files(directory, cfg, lr):
    """A VS-ML learner whose learner.json says it was cloned to run SGD at `lr`."""
    learner = vsml_learner(cfg)
    config = dict(vars(cfg), layer_sizes=list(cfg.layer_sizes))
    write_learner_files(directory, "vsml", config, learner.init_params(jax.random.key(0)),
                        {"pool": 4})
    path = os.path.join(directory, "learner.json")
    with open(path) as f:
        info = json.load(f)
    info["clone"] = {"lr": lr}
    with open(path, "w") as f:
        json.dump(info, f)


def test_evaluate_entry_point_held_out(tmp_path, data_dir):
    cfg = vsml_jax.VSMLConfig(layer_sizes=(49, 10), hidden_size=4, msg_size=4, micro_ticks=1,
                              protocol="predict_then_learn", error_scale=0.5)
    write_clone_files(str(tmp_path / "clone"), cfg, lr=0.02)
    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "experiments.evaluate", f"--checkpoint={tmp_path / 'clone'}",
           "--datasets=mnist", "--episode_length=30", "--seeds=2", "--stream_batch=2",
           "--baselines=tanh_sgd", "--tanh_sgd_lr=clone", "--tanh_sgd_init_scale=0",
           "--test_every=15", "--test_examples=40", f"--data_dir={data_dir}",
           f"--out_dir={out_dir}"]
    # A VS-ML learner on batch-averaged streams (K = 2) and SGD at its cloned rate.
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "streams come from the train split" in proc.stdout

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["settings"]["split"] == "train"
    assert summary["settings"]["held_out"] == {"every": 15, "examples": 40, "split": "test"}
    curves = np.load(out_dir / "curves.npz")
    res = summary["results"]["mnist"]
    assert set(res) == {"clone", "tanh_sgd"}
    assert res["tanh_sgd"]["lr"] == pytest.approx(0.02 * 0.5)  # clone.lr x error_scale
    assert res["tanh_sgd"]["lr_sweep"] is None
    assert res["tanh_sgd"]["config"]["init_scale"] == 0.0
    for method, r in res.items():
        assert {"test_acc@0", "test_acc@15", "test_acc@30", "test_acc_final"} <= set(r["metrics"])
        assert r["held_out"]["steps"] == [0, 15, 30]
        assert r["held_out"]["examples_seen"] == [0, 30, 60]
        acc = curves[f"mnist/{method}/test_acc"]
        assert acc.shape == (2, 3)
        assert r["metrics"]["test_acc_final"]["mean"] == pytest.approx(acc[:, -1].mean(),
                                                                       abs=1e-6)
    # From W = 0 every logit ties: the untrained SGD network predicts class 0.
    assert res["tanh_sgd"]["metrics"]["test_acc@0"]["std"] == 0.0
    assert summary["files"]["test_figure"] == "clone_on_mnist_test_accuracy.png"
    assert (out_dir / summary["files"]["test_figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Streams drawn from the held-out split are refused.
    bad = cmd[:-1] + [f"--out_dir={tmp_path / 'bad'}", "--split=test"]
    proc = subprocess.run(bad, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "would contain the held-out images" in proc.stderr


def test_evaluate_shuffle_pixels(tmp_path, data_dir):
    """Shuffling pixels leaves position-blind learners unchanged, moves the rest."""
    cfg = vsml_jax.VSMLConfig(layer_sizes=(49, 10), hidden_size=4, msg_size=4, micro_ticks=1)
    learner = vsml_learner(cfg)
    save_learner(str(tmp_path / "ckpt"), learner, learner.init_params(jax.random.key(0)),
                 {"pool": 4})
    runs = {}
    for shuffle in (-1, 7):
        out_dir = tmp_path / f"out{shuffle}"
        cmd = [sys.executable, "-m", "experiments.evaluate",
               f"--checkpoint={tmp_path / 'ckpt'}", "--datasets=mnist",
               "--episode_length=40", "--seeds=2",
               "--baselines=nearest_mean,nearest_neighbour,parzen",
               f"--shuffle_pixels={shuffle}", "--test_every=20", "--test_examples=30",
               f"--data_dir={data_dir}", f"--out_dir={out_dir}"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((out_dir / "summary.json").read_text())
        assert summary["settings"]["shuffle_pixels"] == shuffle
        runs[shuffle] = summary["results"]["mnist"]
    plain, shuffled = runs[-1], runs[7]
    for method in ("nearest_mean", "nearest_neighbour", "parzen"):  # blind to pixel order
        for key in ("cum_acc@40", "test_acc_final"):
            assert plain[method]["metrics"][key]["per_seed"] == pytest.approx(
                shuffled[method]["metrics"][key]["per_seed"], abs=1e-6)
    # VS-ML's random cell states meet other pixels: the same seed learns differently.
    assert plain["ckpt"]["metrics"]["mean_loss"]["per_seed"] != pytest.approx(
        shuffled["ckpt"]["metrics"]["mean_loss"]["per_seed"], abs=1e-6)


def test_evaluate_refuses_a_nearest_neighbour_memory_that_does_not_fit(tmp_path):
    cmd = [sys.executable, "-m", "experiments.evaluate", "--baselines=nearest_neighbour",
           "--pool=1", "--episode_length=60000", "--stream_batch=64",
           f"--out_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "112.2 GiB; use fewer --seeds" in proc.stderr


def test_parzen_bandwidth_must_be_positive():
    from vsml_jax.runs.evaluate_settings import EvaluateConfig
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="--parzen_bandwidth=.* must be a positive number"):
            EvaluateConfig(baselines=("parzen",), parzen_bandwidth=bad)


def test_figures_and_labels_are_named_after_the_learner_and_data():
    from vsml_jax.runs.evaluate import checkpoint_label, dataset_label, figure_stem
    assert checkpoint_label("pretrained:mnist") == "pretrained:mnist"
    assert checkpoint_label("runs/quickstart/") == "quickstart"
    assert dataset_label("npz:/data/letters.npz+mnist") == "letters+mnist"
    assert dataset_label("idx:/data/emnist/") == "emnist"
    assert dataset_label("tfds:cifar10") == "cifar10"
    assert figure_stem("pretrained:mnist", ("mnist", "fashion_mnist")) == \
        "pretrained_mnist_on_mnist_fashion_mnist"
    assert figure_stem(None, ("npz:/x/letters.npz",)) == "baselines_on_letters"
