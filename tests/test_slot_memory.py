"""The clock input (VSMLConfig.clock_slot) and the hand-written two-layer
memory learner built on it (vsml_jax.slot_memory, pretrained:slot_memory)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vsml_jax
from vsml_jax import data as vdata
from vsml_jax import evaluation, network, slot_memory
from vsml_jax.baselines import nonparametric
from vsml_jax.learners import vsml_learner
from vsml_jax.pretrained import load_learner


def _stream(data_dir, T, seed=0, split="test"):
    data = vdata.make_dataset("mnist", split, data_dir=data_dir, pool=4)
    xs, ys = evaluation.make_streams(data, [seed], T).materialize()
    return xs[0], ys[0]


def test_clock_is_fed_on_its_slot_and_counts_across_unroll_calls():
    cfg = vsml_jax.VSMLConfig(layer_sizes=(5, 4, 3), hidden_size=4, msg_size=3,
                              micro_ticks=1, coordinates=True, clock_slot=2,
                              clock_scale=0.25)
    x = jnp.arange(5.0)
    msg = network.input_message(cfg, x, step=3)
    np.testing.assert_array_equal(msg[:, 0], x)
    np.testing.assert_array_equal(msg[:, 2], np.full(5, 0.75))
    assert not np.any(msg[:, 1])
    params = vsml_jax.init_params(jax.random.key(0), cfg)
    state = vsml_jax.init_state(jax.random.key(1), cfg)
    rng = np.random.default_rng(0)
    data = (jnp.asarray(rng.standard_normal((12, 5)), jnp.float32),
            jax.nn.one_hot(rng.integers(0, 3, 12), 3))
    final, whole = vsml_jax.unroll(params, state, data)
    assert int(final.step) == 12
    # Two calls continue the clock where the first stopped (chunked evaluation).
    half, first = vsml_jax.unroll(params, state, jax.tree_util.tree_map(lambda a: a[:6], data))
    _, second = vsml_jax.unroll(params, half, jax.tree_util.tree_map(lambda a: a[6:], data))
    np.testing.assert_allclose(np.concatenate([first.logits, second.logits]), whole.logits,
                               rtol=1e-6, atol=1e-7)
    # The cells do read it: without a clock the same V_M computes other logits.
    _, no_clock = vsml_jax.unroll(params.replace(cfg=cfg.replace(clock_slot=-1)),
                                  state, data)
    assert not np.allclose(no_clock.logits, whole.logits)


@pytest.mark.parametrize("changes, message", [
    (dict(clock_slot=3), "clock_slot=3 does not fit in msg_size=3"),
    (dict(clock_slot=0), "clock_slot and input_slot are both 0"),
    (dict(clock_slot=1, clock_scale=0.0), "clock_scale=0.0 must be a finite number > 0"),
])
def test_clock_settings_are_checked(changes, message):
    with pytest.raises(ValueError, match=message):
        vsml_jax.VSMLConfig(layer_sizes=(5, 3), msg_size=3, **changes)


def test_every_slot_holds_its_example_and_label_once(data_dir):
    K, T = 40, 30
    x, y = _stream(data_dir, T)
    learner, params = slot_memory.slot_memory_learner(num_slots=K)
    final, _ = learner.unroll(params, learner.init_state(jax.random.key(0)), (x, y))
    stored = np.asarray(final.layers[0].c[:, :, slot_memory.S]).T        # [K, A]
    # c holds tanh(squash (x - X_MIN)); the cell sends tanh(c) = phi(x).
    np.testing.assert_allclose(
        stored[:T], np.tanh(slot_memory.SQUASH * (np.asarray(x) - slot_memory.X_MIN)),
        atol=2e-6)
    assert not np.any(stored[T:])                                         # slots still free
    labels = np.asarray(final.layers[1].c[:, :, 0])                       # [K, C]
    np.testing.assert_allclose(labels[:T], y, atol=1e-6)
    assert not np.any(labels[T:])


def test_its_decisions_are_those_of_the_rule(data_dir):
    """Step t predicts like the Parzen rule over examples 0 .. t-1."""
    K, T = 64, 60
    x, y = _stream(data_dir, T, seed=1)
    learner, params = slot_memory.slot_memory_learner(num_slots=K)
    _, out = learner.unroll(params, learner.init_state(jax.random.key(0)), (x, y))
    # Examples 0 .. t-1 for step t: the later ones masked out of the labels.
    earlier = lambda t: y * (jnp.arange(T) < t)[:, None]
    rule = np.asarray(jax.vmap(lambda t: slot_memory.rule_scores(x, earlier(t), x[t]))(
        jnp.arange(1, T)))
    logits = np.asarray(out.logits[1:])
    agree = np.argmax(logits, -1) == np.argmax(rule, -1)
    top = np.sort(rule, -1)
    clear = (top[:, -1] > 1e-4) & (top[:, -1] > 1.2 * top[:, -2])
    assert clear.mean() > 0.5 and agree[clear].all()
    # Elsewhere the learner's distances (tanh units in their linear range, ~1%
    # from the rule's squares) could tip near ties, and its kernel, two LSTM
    # gates computed as (1 + tanh(z / 4)) / 2, is 0 below ~1e-14 where the
    # rule's is not: every disagreement here is such an underflow.
    assert agree.mean() >= 0.95, agree.mean()
    assert np.all(logits[~agree] == 0.0) and np.all(top[~agree, -1] < 1e-12)


def test_shipped_learner_is_the_construction_and_beats_the_class_mean(data_dir):
    loaded = load_learner("pretrained:slot_memory")
    assert loaded.pool == 4 and loaded.info["construction"]["meta_learned"] is False
    want = slot_memory.slot_memory_params(loaded.learner.config)
    for a, b in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, b)
    # On real test streams of 300, with a 300-slot copy (same V_M, fewer cells):
    # above the nearest class mean, which it cannot express with one layer.
    data = vdata.make_dataset("mnist", "test", data_dir=data_dir, pool=4)
    streams = evaluation.make_streams(data, [0, 1], 300)
    learner, params = slot_memory.slot_memory_learner(num_slots=300)
    ours = np.asarray(evaluation.evaluate_learner(learner, params, streams, [0, 1]).correct)
    nm = nonparametric.nearest_mean_learner(49)
    theirs = np.asarray(evaluation.evaluate_learner(nm, None, streams, [0, 1]).correct)
    assert ours.mean() > theirs.mean() + 0.02, (ours.mean(), theirs.mean())
    assert vsml_learner(loaded.learner.config).config == loaded.learner.config
