"""Baseline learners: online backprop, the Meta RNN, the learned local rule, lr sweeps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from vsml_jax import evaluation
from vsml_jax.baselines import hebbian, meta_rnn, nonparametric, online_gd


def separable_stream(seed, T=300, D=8, C=3, margin=3.0):
    """A linearly separable stream: class c is a Gaussian blob around margin * e_c.

    Drawn with numpy: test data needs no compiled JAX random programs.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, T)
    x = margin * np.eye(C, D)[y] + 0.5 * rng.standard_normal((T, D))
    return jnp.asarray(x, jnp.float32), jnp.asarray(np.eye(C)[y], jnp.float32)


def first_label_changed(labels):
    """The same stream with the first label moved to another class."""
    return labels.at[0].set(jnp.roll(labels[0], 1))


def test_online_adam_learns_a_separable_stream():
    x, y = separable_stream(0)
    learner = online_gd.online_gd_learner(8, 3, optimizer="adam", learning_rate=0.05)
    state = learner.init_state(jax.random.key(1))
    _, out = jax.jit(learner.unroll)(None, state, (x, y))
    assert out.logits.shape == (300, 3) and out.loss.shape == (300,)
    # Chance is 1/3; after the first examples it should be almost always right.
    assert float(jnp.mean(out.correct)) > 0.85
    assert float(jnp.mean(out.correct[-100:])) > 0.95

    # The learning rate lives in the optimizer state: learners that differ only
    # in it share one unroll function (a sweep compiles once) yet learn differently.
    slow = online_gd.online_gd_learner(8, 3, optimizer="adam", learning_rate=0.001)
    assert slow.unroll is learner.unroll
    _, out_slow = jax.jit(slow.unroll)(None, slow.init_state(jax.random.key(1)), (x, y))
    np.testing.assert_array_equal(out.logits[0], out_slow.logits[0])
    assert not np.allclose(out.logits[1:], out_slow.logits[1:])


@pytest.mark.parametrize("make", [
    lambda: online_gd.online_gd_learner(8, 3, optimizer="adam", learning_rate=0.05),
    lambda: online_gd.online_gd_learner(8, 3, optimizer="sgd", learning_rate=0.5,
                                        hidden_sizes=(16,)),
    lambda: meta_rnn.meta_rnn_learner(8, 3, hidden_size=8),
    lambda: hebbian.hebbian_learner(8, 3, rule_hidden=4),
], ids=["adam", "sgd_mlp", "meta_rnn", "hebbian"])
def test_predict_then_update(make):
    """y_t's prediction never depends on y_t, but the next one depends on y_t."""
    learner = make()
    x, y = separable_stream(2, T=3)
    params = learner.init_params(jax.random.key(3))
    state = learner.init_state(jax.random.key(4))
    run = jax.jit(learner.unroll)
    _, out_a = run(params, state, (x, y))
    _, out_b = run(params, state, (x, first_label_changed(y)))
    np.testing.assert_array_equal(out_a.logits[0], out_b.logits[0])
    assert not np.allclose(out_a.logits[1], out_b.logits[1])


def test_tanh_linear_takes_exact_sgd_steps():
    """One step of y = tanh(x) W + b with SGD: W -= lr tanh(x) (softmax(y^) - y)^T."""
    lr = 0.3
    learner = online_gd.tanh_linear_learner(5, 4, learning_rate=lr)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5)), jnp.float32)
    y = jnp.asarray(np.eye(4)[[2]], jnp.float32)
    state = learner.init_state(jax.random.key(1))
    w0, b0 = state.net["w"][0], state.net["b"][0]
    new, out = learner.unroll(None, state, (x, y))
    logits = jnp.tanh(x[0]) @ w0 + b0
    err = jax.nn.softmax(logits) - y[0]
    np.testing.assert_allclose(out.logits[0], logits, rtol=1e-6)
    np.testing.assert_allclose(new.net["w"][0], w0 - lr * jnp.outer(jnp.tanh(x[0]), err),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new.net["b"][0], b0 - lr * err, rtol=1e-5, atol=1e-7)


def test_online_gd_minibatch_streams():
    """Inputs [T, K, D]: K examples per step, one network, mean gradient."""
    x, y = separable_stream(0, T=8)
    xb, yb = x.reshape(2, 4, 8), y.reshape(2, 4, 3)
    lr = 0.1
    learner = online_gd.online_gd_learner(8, 3, optimizer="sgd", learning_rate=lr)
    state = learner.init_state(jax.random.key(1))
    _, out = learner.unroll(None, state, (xb, yb))
    assert out.logits.shape == (2, 4, 3) and out.correct.shape == (2, 4)
    # Step 2 predicts with the weights after the mean gradient of step 1's 4 examples.
    w0, b0 = state.net["w"][0], state.net["b"][0]
    err = jax.nn.softmax(xb[0] @ w0 + b0) - yb[0]
    w1, b1 = w0 - lr * xb[0].T @ err / 4, b0 - lr * err.mean(0)
    np.testing.assert_allclose(out.logits[1], xb[1] @ w1 + b1, rtol=1e-5, atol=1e-5)


def test_meta_rnn_under_jit_vmap_grad():
    cfg = meta_rnn.MetaRNNConfig(num_inputs=8, num_classes=3, hidden_size=8)
    learner = meta_rnn.learner_from_config(cfg)
    params = learner.init_params(jax.random.key(0))
    S, T = 3, 7
    x, y = (a.reshape(S, T, -1) for a in separable_stream(1, T=S * T))
    states = jax.vmap(learner.init_state)(jax.random.split(jax.random.key(3), S))

    def loss(p):
        _, out = jax.vmap(learner.unroll, in_axes=(None, 0, 0))(p, states, (x, y))
        return jnp.mean(out.loss), out

    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert out.logits.shape == (S, T, 3) and out.loss.shape == (S, T)
    assert out.correct.shape == (S, T) and np.isfinite(float(value))
    flat = jnp.concatenate([g.ravel() for g in jax.tree_util.tree_leaves(grads)])
    assert bool(jnp.all(jnp.isfinite(flat))) and float(jnp.linalg.norm(flat)) > 0
    # |V_M| = 4H(D + C + H) + 4H (LSTM) + (H + 1) C (read-out).
    H, D, C = 8, 8, 3
    assert meta_rnn.count_params(cfg) == 4 * H * (D + C + H) + 4 * H + (H + 1) * C
    n = sum(a.size for a in jax.tree_util.tree_leaves(params))
    assert meta_rnn.count_params(cfg) == n


def test_meta_rnn_feedback_options_and_errors():
    for feedback, width in [("error", 4), ("label", 4), ("both", 8)]:
        cfg = meta_rnn.MetaRNNConfig(6, 4, 8, feedback)
        assert meta_rnn.init_state(cfg).feedback.shape == (width,)
    with pytest.raises(ValueError, match="feedback"):
        meta_rnn.MetaRNNConfig(6, 4, 8, "reward")
    learner = meta_rnn.meta_rnn_learner(6, 4, 8)
    with pytest.raises(ValueError, match="expected \\[T, 6\\]"):
        learner.unroll(None, learner.init_state(None),
                       (jnp.zeros((3, 2, 6)), jnp.zeros((3, 2, 4))))


def test_hebbian_rule_is_shared_and_differentiable():
    learner = hebbian.hebbian_learner(8, 3, rule_hidden=4)
    theta = learner.init_params(jax.random.key(0))
    # The rule's size does not depend on D or C.
    assert sum(a.size for a in jax.tree_util.tree_leaves(theta)) == 4 * 4 + 4 + 4 + 1
    x, y = separable_stream(3, T=5)
    state = learner.init_state(jax.random.key(2))
    g = jax.grad(lambda t: jnp.mean(learner.unroll(t, state, (x, y))[1].loss))(theta)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree_util.tree_leaves(g))
    assert float(jnp.abs(g["w2"]).sum()) > 0


def test_sweep_picks_the_best_mean_cumulative_accuracy():
    streams = [separable_stream(seed, T=60) for seed in (5, 6)]
    x, y = jnp.stack([s[0] for s in streams]), jnp.stack([s[1] for s in streams])
    seeds = [11, 12]
    make = lambda lr: online_gd.online_gd_learner(8, 3, optimizer="sgd", learning_rate=lr)
    lrs = [0.0, 1.0, 1e-4]
    best, table = evaluation.sweep_learning_rate(make, lrs, (x, y), seeds)
    assert [r["lr"] for r in table] == lrs
    # Recompute the criterion independently for every lr.
    for row in table:
        out = evaluation.evaluate_learner(make(row["lr"]), None, (x, y), seeds)
        assert row["score"] == pytest.approx(float(np.mean(out.correct)))
    assert best == max(table, key=lambda r: r["score"])["lr"]
    # lr 0 cannot learn; lr 1 on a well separated stream must beat it clearly.
    assert best == 1.0 and table[1]["score"] > table[0]["score"] + 0.3


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="optimizer='rmsprop' is unknown"):
        online_gd.OnlineGDConfig(num_inputs=4, optimizer="rmsprop")
    learner = online_gd.online_gd_learner(8, 3)
    with pytest.raises(ValueError, match="expected \\[T, 8\\]"):
        learner.unroll(None, learner.init_state(jax.random.key(0)),
                       (jnp.zeros((3, 7)), jnp.zeros((3, 3))))


def _nonparametric_by_hand(method, x, y):
    """Step-by-step numpy predictions of nearest class mean / 1-NN / Parzen
    window (default bandwidth); x [T, K, D]."""
    preds, seen_x, seen_y = [], [], []
    for xt, yt in zip(x, y):
        row = []
        for xk in xt:
            if not seen_y:
                row.append(0)  # nothing seen: every class scores 0, argmax is 0
                continue
            sx, sy = np.array(seen_x), np.array(seen_y)
            if method == "nearest_mean":
                classes = np.unique(sy)
                d = [np.sum((sx[sy == c].mean(0) - xk) ** 2) for c in classes]
                row.append(classes[int(np.argmin(d))])
            elif method == "parzen":
                classes = np.unique(sy)
                h2d = 2 * nonparametric.DEFAULT_BANDWIDTH ** 2 * x.shape[-1]
                k = np.exp(-np.sum((sx - xk) ** 2, -1).astype(np.float64) / h2d)
                row.append(classes[int(np.argmax([np.mean(k[sy == c]) for c in classes]))])
            else:
                row.append(sy[int(np.argmin(np.sum((sx - xk) ** 2, -1)))])
        preds.append(row)
        seen_x += list(xt)
        seen_y += list(yt)
    return np.array(preds)


@pytest.mark.parametrize("method", nonparametric.METHODS)
@pytest.mark.parametrize("K", [0, 2])
def test_nonparametric_learners_match_a_numpy_loop(method, K):
    rng = np.random.default_rng(3)
    T, D, C = 30, 6, 4
    labels = rng.integers(0, C, (T, max(K, 1)))
    x = rng.standard_normal((T, max(K, 1), D)) + 3.0 * np.eye(C, D)[labels]
    expected = _nonparametric_by_hand(method, x, labels)
    learner = nonparametric.nonparametric_learner(D, C, method=method, memory_size=T * 2)
    xs, ys = jnp.asarray(x, jnp.float32), jax.nn.one_hot(labels, C)
    if not K:
        xs, ys, expected = xs[:, 0], ys[:, 0], expected[:, 0]
    state, out = jax.jit(learner.unroll)(None, learner.init_state(None), (xs, ys))
    np.testing.assert_array_equal(np.argmax(out.logits, -1), expected)
    assert out.correct.shape == expected.shape and np.isfinite(out.loss).all()
    # It learned something on these blobs, far above chance 1/C.
    assert float(np.mean(out.correct[T // 2:])) > 0.7
    # predict = what the next step would score.
    probe = jnp.asarray(rng.standard_normal((5, D)), jnp.float32)
    _, nxt = learner.unroll(None, state, (probe[:1], jax.nn.one_hot(jnp.zeros(1, int), C)))
    np.testing.assert_allclose(learner.predict(None, state, probe)[:1], nxt.logits,
                               rtol=1e-6)


def test_parzen_between_nearest_neighbour_and_its_kernel_scores():
    """A narrow window decides like 1-NN; scores are the log kernel class means
    even where every kernel value underflows float32 (far-away inputs)."""
    rng = np.random.default_rng(5)
    T, D, C = 40, 5, 3
    labels = rng.integers(0, C, T)
    x = jnp.asarray(rng.standard_normal((T, D)) * 4.0, jnp.float32)
    y = jax.nn.one_hot(labels, C)
    nn = nonparametric.nearest_neighbour_learner(D, C, memory_size=T)
    narrow = nonparametric.parzen_learner(D, C, memory_size=T, bandwidth=1e-3)
    _, out_nn = nn.unroll(None, nn.init_state(None), (x, y))
    _, out_p = narrow.unroll(None, narrow.init_state(None), (x, y))
    np.testing.assert_array_equal(np.argmax(out_p.logits, -1), np.argmax(out_nn.logits, -1))
    assert np.isfinite(out_p.logits).all()
    wide = nonparametric.parzen_learner(D, C, memory_size=T, bandwidth=0.5)
    state, _ = wide.unroll(None, wide.init_state(None), (x, y))
    q = np.asarray(x[:3]) + 100.0  # exp(-d2 / (2 h^2 D)) = exp(-~8000): 0 in float32
    d2 = np.sum((np.asarray(x, np.float64)[None] - q[:, None]) ** 2, -1) / (2 * 0.25 * D)
    want = np.stack([scipy.special.logsumexp(-d2[:, labels == c], axis=1)
                     - np.log(np.sum(labels == c)) for c in range(C)], -1)
    np.testing.assert_allclose(wide.predict(None, state, jnp.asarray(q, jnp.float32)), want,
                               rtol=1e-4)
    with pytest.raises(ValueError, match="bandwidth=0"):
        nonparametric.parzen_learner(D, C, bandwidth=0)


def test_nearest_neighbour_memory_must_hold_the_stream():
    learner = nonparametric.nearest_neighbour_learner(4, 3, memory_size=5)
    x, y = jnp.zeros((6, 4)), jax.nn.one_hot(jnp.zeros(6, int), 3)
    with pytest.raises(ValueError, match="memory_size >= 6"):
        learner.unroll(None, learner.init_state(None), (x, y))
    with pytest.raises(ValueError, match="method='knn'"):
        nonparametric.NonparametricConfig(num_inputs=4, method="knn")
