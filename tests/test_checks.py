"""Bad values inside an episode: NaN inputs, labels that are not one-hot, wrong widths.

- `correct` is 0 wherever the logits are not finite (VS-ML and every baseline);
- the host-side validators of `vsml_jax.checks` name the first bad index;
- `checked_unroll` / `checkify_unroll` report bad data under jit;
- `predict_pass` and the predicts say which width they expected.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import vsml_jax
from vsml_jax import checks
from vsml_jax.baselines import hebbian, meta_rnn, nonparametric, online_gd
from vsml_jax.data import Dataset
from vsml_jax.learners import vsml_learner

CFG = vsml_jax.VSMLConfig(layer_sizes=(6, 3), hidden_size=4, msg_size=3, micro_ticks=1)
T, NAN_STEP = 8, 3


def stream(seed=0, T=T, D=6, C=3, classes=None):
    """inputs [T, D] (numpy normal draws), one-hot labels [T, C] of `classes` [T]."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, D)).astype(np.float32)
    y = rng.integers(0, C, T) if classes is None else np.asarray(classes)
    return x, np.eye(C, dtype=np.float32)[y]


def with_nan(x, t=NAN_STEP, d=2):
    x = x.copy()
    x[t, d] = np.nan
    return x


def assert_nonfinite_rows_not_correct(out, labels):
    """correct == 0 where a logit is NaN/inf, == (argmax match) elsewhere."""
    logits, correct = np.asarray(out.logits, np.float32), np.asarray(out.correct)
    finite = np.all(np.isfinite(logits), -1)
    assert not finite.all(), "the NaN pixel should make some logits non-finite"
    np.testing.assert_array_equal(correct[~finite], 0)
    hit = np.argmax(logits, -1) == np.argmax(np.asarray(labels), -1)
    np.testing.assert_array_equal(correct[finite], hit[finite].astype(correct.dtype))


# ------------------------------------------------------------- correct vs NaN
def test_correct_from_logits():
    logits = jnp.array([[jnp.nan, 0.0, 0.0], [0.0, jnp.inf, 0.0], [3.0, 1.0, 0.0],
                        [0.0, 1.0, 0.0]])
    labels = jnp.eye(3)[jnp.array([0, 1, 0, 2])]
    np.testing.assert_array_equal(vsml_jax.correct_from_logits(logits, labels), [0, 0, 1, 0])
    assert vsml_jax.correct_from_logits(logits.astype(jnp.bfloat16), labels).dtype == \
        jnp.bfloat16


def test_vsml_nan_pixel_is_never_correct():
    """All labels are class 0, which is where argmax puts a NaN row: before the
    fix every step from the NaN pixel on counted as correct."""
    params = vsml_jax.init_params(jax.random.key(0), CFG)
    state = vsml_jax.init_state(jax.random.key(1), CFG)
    x, y = stream(classes=np.zeros(T, int))
    _, out = jax.jit(vsml_jax.unroll)(params, state, (with_nan(x), y))
    logits = np.asarray(out.logits)
    assert np.all(np.isfinite(logits[:NAN_STEP]))
    assert np.all(np.isnan(logits[NAN_STEP:]))  # the NaN spreads to every later step
    np.testing.assert_array_equal(np.asarray(out.correct)[NAN_STEP:], 0)
    assert_nonfinite_rows_not_correct(out, y)
    # Batch-averaged streams [T, K, D]: the NaN of stream 1 reaches both streams.
    x2, y2 = stream(1, classes=np.zeros(T, int))
    xs, ys = np.stack([x, with_nan(x2)], 1), np.stack([y, y2], 1)
    _, out = vsml_jax.unroll(params, vsml_jax.init_state_for_streams(state, 2), (xs, ys))
    assert_nonfinite_rows_not_correct(out, ys)
    np.testing.assert_array_equal(np.asarray(out.correct)[NAN_STEP + 1:], 0)


BASELINES = {
    "adam": lambda: online_gd.online_gd_learner(6, 3, optimizer="adam", learning_rate=0.05),
    "sgd": lambda: online_gd.online_gd_learner(6, 3, optimizer="sgd", learning_rate=0.5),
    "meta_rnn": lambda: meta_rnn.meta_rnn_learner(6, 3, hidden_size=4),
    "hebbian": lambda: hebbian.hebbian_learner(6, 3, rule_hidden=2),
    "nearest_mean": lambda: nonparametric.nearest_mean_learner(6, 3),
    "nearest_neighbour": lambda: nonparametric.nearest_neighbour_learner(6, 3, memory_size=T),
}


@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_nan_pixel_is_never_correct(name):
    learner = BASELINES[name]()
    x, y = stream(classes=np.zeros(T, int))
    _, out = learner.unroll(learner.init_params(jax.random.key(0)),
                            learner.init_state(jax.random.key(1)), (with_nan(x), y))
    assert not np.all(np.isfinite(np.asarray(out.logits)[NAN_STEP]))
    assert float(out.correct[NAN_STEP]) == 0.0
    assert_nonfinite_rows_not_correct(out, y)


def test_online_adam_minibatch_nan_is_never_correct():
    learner = BASELINES["adam"]()
    x, y = stream(classes=np.zeros(T, int))
    xs, ys = with_nan(x).reshape(4, 2, 6), y.reshape(4, 2, 3)
    _, out = learner.unroll(None, learner.init_state(jax.random.key(1)), (xs, ys))
    assert out.correct.shape == (4, 2)
    assert_nonfinite_rows_not_correct(out, ys)


# ------------------------------------------------------ host-side validators
@pytest.mark.parametrize("row,why", [
    ([0, 0, 0], "is all zeros"),
    ([0, -1, 0], "negative"),
    ([0, 2, 0], "other than 0 and 1"),
    ([0.9, 0.05, 0.05], "other than 0 and 1"),
    ([1, 1, 0], "has 2 ones"),
    ([np.nan, 1, 0], "non-finite"),
])
def test_labels_that_are_not_one_hot_are_rejected_with_their_index(row, why):
    x, y = stream(T=10)
    checks.check_stream_values(x, y, num_classes=3)  # the clean stream passes
    y[5], y[7] = row, row
    with pytest.raises(ValueError, match=r"train: labels\[5\] is not one-hot") as e:
        checks.check_stream_values(x, y, num_classes=3, where="train")
    assert why in str(e.value) and "2 rows are not" in str(e.value)
    assert "jax.nn.one_hot" in str(e.value)  # the fix
    # Streams [T, K, D]: the index names the stream too.
    xs, ys = np.stack([x, x], 1), np.stack([np.eye(3)[np.argmax(stream(T=10)[1], -1)], y], 1)
    with pytest.raises(ValueError, match=r"labels\[5, 1\] is not one-hot"):
        checks.check_stream_values(xs, ys)


def test_nonfinite_inputs_are_rejected_with_their_index():
    x = np.zeros((50, 784), np.float32)
    y = np.eye(10, dtype=np.float32)[np.arange(50) % 10]
    x[40, 3] = np.inf
    x[37, 412] = np.nan
    with pytest.raises(ValueError, match=r"inputs\[37, 412\] is nan \(the first of 2 "):
        checks.check_stream_values(x, y, num_classes=10, num_inputs=784)
    x[37, 412] = 0
    with pytest.raises(ValueError, match=r"inputs\[40, 3\] is inf"):
        checks.check_stream_values(x, y)
    with pytest.raises(ValueError, match="width 784 but the learner takes 49"):
        checks.check_stream_values(x, y, num_inputs=49)
    # Large finite values overflow the fast path's float32 sum; they must pass.
    big = np.full((50, 784), 3e38, np.float32)
    checks.check_stream_values(big, y, num_classes=10)
    checks.check_stream_values(jnp.asarray(big, jnp.bfloat16), y)  # bf16 overflows to inf


def test_class_index_labels():
    x, _ = stream(T=10)
    labels = np.arange(10) % 3
    checks.check_stream_values(x, labels, num_classes=3)
    labels[4] = 12
    with pytest.raises(ValueError, match=r"labels\[4\] = 12 is not a class index in \[0, 3\)"):
        checks.check_stream_values(x, labels, num_classes=3)
    with pytest.raises(ValueError, match="pass num_classes"):
        checks.check_stream_values(x, labels)
    with pytest.raises(ValueError, match="dtype float64; expected integers"):
        checks.check_stream_values(x, labels.astype(np.float64), num_classes=3)
    with pytest.raises(ValueError, match=r"labels have shape \(9,\)"):
        checks.check_stream_values(x, labels[:9], num_classes=3)
    with pytest.raises(ValueError, match="labels have 4 classes"):
        checks.check_stream_values(x, np.eye(4)[labels % 3], num_classes=3)


def test_dataset_values_name_the_first_bad_example():
    images = np.zeros((100, 28, 28), np.uint8)  # uint8 images are always finite
    labels = np.arange(100) % 10
    checks.check_dataset_values(images, labels, 10, "mnist/train")
    floats = images.reshape(100, -1).astype(np.float32)
    floats[37, 412], floats[60, 0] = np.nan, -np.inf
    with pytest.raises(ValueError, match=r"mnist/train: example 37: images\[37, 412\] is nan"):
        checks.check_dataset_values(floats, labels, 10, "mnist/train")
    labels[5], labels[8] = 10, -1
    with pytest.raises(ValueError, match=r"mnist/test: example 5: labels\[5\] = 10 is not a "
                                         r"class index in \[0, 10\) \(2 such labels\)"):
        checks.check_dataset_values(images, labels, 10, "mnist/test")
    with pytest.raises(ValueError, match=r"labels have shape \(99,\)"):
        checks.check_dataset_values(images, labels[:99], 10)
    # A vsml_jax.data.Dataset, named by its own name.
    data = Dataset(images=jnp.asarray(floats), labels=jnp.arange(100) % 10, name="toy")
    with pytest.raises(ValueError, match=r"toy: example 37: images\[37, 412\] is nan"):
        checks.check_dataset(data)
    checks.check_dataset(Dataset(images=jnp.zeros((4, 3)), labels=jnp.arange(4),
                                 num_classes=4))


# ---------------------------------------------------------- checkify, under jit
checked_jit = jax.jit(vsml_jax.checked_unroll, static_argnames=("float_checks",))


def test_checked_unroll_reports_nan_inputs_and_bad_labels_under_jit():
    params = vsml_jax.init_params(jax.random.key(0), CFG)
    state = vsml_jax.init_state(jax.random.key(1), CFG)
    x, y = stream()
    err, (final, out) = checked_jit(params, state, (x, y))
    assert err.get() is None
    err.throw()  # nothing to raise
    plain_final, plain = jax.jit(vsml_jax.unroll)(params, state, (x, y))
    np.testing.assert_allclose(out.logits, plain.logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(final.layers[0].c, plain_final.layers[0].c, rtol=1e-6,
                               atol=1e-6)

    err, _ = checked_jit(params, state, (with_nan(x), y))  # same shapes: no recompile
    assert "inputs[3, 2] is nan (not finite)" in err.get()
    with pytest.raises(checkify.JaxRuntimeError, match=r"inputs\[3, 2\] is nan"):
        err.throw()

    bad = y.copy()
    bad[5] = 0.5 * bad[5]
    err, _ = checked_jit(params, state, (x, bad))
    assert "labels[5] is not one-hot (sum 0.5)" in err.get()

    # vmap over episodes: the first bad one is reported.
    xs, ys = np.stack([x, x]), np.stack([y, bad])
    states = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), state)
    err, _ = jax.jit(jax.vmap(vsml_jax.checked_unroll, in_axes=(None, 0, 0)))(
        params, states, (xs, ys))
    assert "labels[5] is not one-hot" in err.get()


def test_checked_unroll_float_checks_find_a_nan_made_inside():
    """A NaN in V_M (not in the data) is found only with float_checks."""
    params = vsml_jax.init_params(jax.random.key(0), CFG)
    params = params.replace(cells=params.cells.replace(
        bias=params.cells.bias.at[0].set(jnp.nan)))
    state = vsml_jax.init_state(jax.random.key(1), CFG)
    x, y = stream()
    err, _ = checked_jit(params, state, (x, y))
    assert err.get() is None
    err, (_, out) = checked_jit(params, state, (x, y), float_checks=True)
    assert "nan generated by primitive" in err.get()
    np.testing.assert_array_equal(out.correct, 0)  # every logit is NaN


def test_checkify_unroll_wraps_a_baseline_learner():
    learner = BASELINES["adam"]()
    checked = jax.jit(checks.checkify_unroll(learner.unroll, where="adam"))
    x, y = stream()
    state = learner.init_state(jax.random.key(1))
    err, (_, out) = checked(None, state, (x, y))
    assert err.get() is None and out.logits.shape == (T, 3)
    err, _ = checked(None, state, (with_nan(x, t=6, d=5), y))
    assert "adam: inputs[6, 5] is nan" in err.get()


# --------------------------------------------------------------- wrong widths
def test_predict_pass_names_the_expected_width():
    cfg = vsml_jax.VSMLConfig(layer_sizes=(49, 3), hidden_size=2, msg_size=2)
    params = vsml_jax.init_params(jax.random.key(0), cfg)
    state = vsml_jax.init_state(jax.random.key(1), cfg)
    with pytest.raises(ValueError, match=r"predict_pass: x has width 784 but the config's "
                                         r"first layer has 49 input neurons.*pool"):
        vsml_jax.predict_pass(params, state.layers, jnp.zeros(784))
    with pytest.raises(ValueError, match=r"predict_pass: x has shape \(2, 49\); expected one "
                                         r"input vector \[49\].*vsml_predict"):
        vsml_jax.predict_pass(params, state.layers, jnp.zeros((2, 49)))
    streams = vsml_jax.init_state_for_streams(state, 4)
    with pytest.raises(ValueError, match="layers do not match the config.*copy 0"):
        vsml_jax.predict_pass(params, streams.layers, jnp.zeros(49))
    with pytest.raises(ValueError, match="step: x has width 784"):
        vsml_jax.step(params, state, jnp.zeros(784), jnp.eye(3)[0])
    with pytest.raises(ValueError, match=r"step: y has shape \(10,\)"):
        vsml_jax.step(params, state, jnp.zeros(49), jnp.eye(10)[0])
    with pytest.raises(ValueError, match=r"forward_pass: err_msg has shape \(3,\)"):
        vsml_jax.forward_pass(params, state.layers, jnp.zeros(49), jnp.zeros(3))
    learner = vsml_learner(cfg)
    with pytest.raises(ValueError, match="inputs have width 784 but the learner takes 49"):
        learner.predict(params, state, jnp.zeros((5, 784)))
    # A state of K averaged streams still predicts (copy 0), and the right width works.
    logits = learner.predict(params, streams, jnp.zeros((2, 49)))
    assert logits.shape == (2, 3)


@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_predict_names_the_expected_width(name):
    learner = BASELINES[name]()
    params = learner.init_params(jax.random.key(0))
    state = learner.init_state(jax.random.key(1))
    with pytest.raises(ValueError, match="inputs have width 784 but the learner takes 6"):
        learner.predict(params, state, jnp.zeros((5, 784)))
    with pytest.raises(ValueError, match=r"inputs have shape \(6,\); expected \[N, 6\]"):
        learner.predict(params, state, jnp.zeros(6))
    assert learner.predict(params, state, jnp.zeros((5, 6))).shape == (5, 3)
