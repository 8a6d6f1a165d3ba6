"""Task augmentation for meta-training a general learner.

Class subsets and pixel permutations (vsml_jax.data.augment), mixed episode
lengths as a per-step weighting of the meta-loss (vsml_jax.meta.objective),
and why a pixel permutation adds nothing for a tied VS-ML layer.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vsml_jax
from vsml_jax.data import augment
from vsml_jax.data.episodes import synthetic_dataset
from vsml_jax.learners import vsml_learner
from vsml_jax.meta import objective
from vsml_jax.runs.meta_train import MetaTrainConfig

CFG = vsml_jax.VSMLConfig(layer_sizes=(6, 4), hidden_size=4, msg_size=2, micro_ticks=1,
                          readout_scale=5.0)


def _data(n=200, d=6, c=4):
    return synthetic_dataset(jax.random.PRNGKey(3), n, d, num_classes=c)


# --------------------------------------------------------- class subsets
def test_class_subsets_show_between_min_classes_and_all_classes():
    data = _data(n=400, c=4)
    x, y = augment.sample_augmented_episodes(
        jax.random.PRNGKey(0), data.images, data.labels, length=60, batch=64,
        permute_labels=True, min_classes=2, num_classes=4)
    assert x.shape == (64, 60, 6) and y.shape == (64, 60, 4)
    np.testing.assert_allclose(np.asarray(y).sum(-1), 1.0)
    shown = (np.asarray(y).sum(1) > 0).sum(-1)            # classes per episode [B]
    assert shown.min() >= 2 and shown.max() <= 4
    # k ~ U{2..4}: every subset size occurs in 64 episodes.
    assert set(shown.tolist()) == {2, 3, 4}


def test_class_subsets_draw_real_examples_of_their_classes():
    data = _data(n=300, c=4)
    x, y = augment.sample_augmented_episodes(
        jax.random.PRNGKey(1), data.images, data.labels, length=20, batch=8,
        permute_labels=False, min_classes=2, num_classes=4)
    images, labels = np.asarray(data.images), np.asarray(data.labels)
    for e in range(8):
        for t in range(20):
            row = np.flatnonzero((images == np.asarray(x[e, t])).all(-1))
            assert row.size == 1, "every input is one example of the data set"
            assert labels[row[0]] == int(np.argmax(y[e, t]))
        # Drawn without replacement.
        rows = {tuple(np.asarray(x[e, t])) for t in range(20)}
        assert len(rows) == 20


def test_pixel_permutation_permutes_inputs_with_its_probability():
    data = _data(n=100, d=6)
    kw = dict(length=10, batch=16, permute_labels=False, num_classes=4)
    key = jax.random.PRNGKey(2)
    plain, _ = augment.sample_augmented_episodes(key, data.images, data.labels, **kw)
    always, _ = augment.sample_augmented_episodes(key, data.images, data.labels,
                                                  pixel_permute_prob=1.0, **kw)
    permuted = 0
    for e in range(16):
        # One permutation per episode, applied to every step.
        a, b = np.asarray(plain[e]), np.asarray(always[e])
        perm = [int(np.flatnonzero(np.all(a == b[:, [j]], axis=0))[0]) for j in range(6)]
        np.testing.assert_array_equal(a[:, perm], b)
        permuted += perm != list(range(6))
    assert permuted >= 14


def test_augmentation_settings_are_checked():
    data = _data()
    with pytest.raises(ValueError, match="min_classes"):
        augment.sample_augmented_episodes(jax.random.PRNGKey(0), data.images, data.labels,
                                          10, 2, min_classes=1, num_classes=4)
    with pytest.raises(ValueError, match="pixel_permute_prob"):
        augment.sample_augmented_episodes(jax.random.PRNGKey(0), data.images, data.labels,
                                          10, 2, pixel_permute_prob=1.5, num_classes=4)


# ------------------------------------------------------ mixed lengths
def test_length_weights_are_the_mean_of_truncated_episode_means():
    T, m = 12, 4
    w = objective.length_weights(T, m)
    assert w.shape == (T,) and np.isclose(w.sum(), 1.0)
    assert np.all(np.diff(w) <= 1e-12) and w[0] > w[-1]
    ce = np.random.default_rng(0).uniform(size=T)
    expected = np.mean([ce[:L].mean() for L in range(m, T + 1)])
    assert np.isclose(ce @ w, expected)
    np.testing.assert_allclose(objective.length_weights(T, 0), np.full(T, 1 / T))
    np.testing.assert_allclose(objective.length_weights(T, T), np.full(T, 1 / T))
    with pytest.raises(ValueError, match="min_length"):
        objective.length_weights(T, T + 1)


def test_mixed_length_loss_equals_running_truncated_episodes():
    """The weighted loss of full episodes is the mean loss of episodes really
    cut at every L in min_length..T (each prediction precedes its label)."""
    T, m = 8, 3
    learner = vsml_learner(CFG)
    params = learner.init_params(jax.random.PRNGKey(0))
    data = _data()
    spec = objective.EpisodeSpec(length=T, batch=3, min_length=m)
    inputs, labels = objective.sample_batch(jax.random.PRNGKey(5), data, spec)
    key = jax.random.PRNGKey(6)
    weighted, _ = objective.episodes_loss(learner, params, key, (inputs, labels),
                                          step_weights=objective.length_weights(T, m))
    cut = [objective.episodes_loss(learner, params, key, (inputs[:, :L], labels[:, :L]))[0]
           for L in range(m, T + 1)]
    np.testing.assert_allclose(weighted, np.mean(cut), rtol=1e-5)
    plain, _ = objective.episodes_loss(learner, params, key, (inputs, labels))
    assert not np.isclose(weighted, plain)


def test_episode_batch_loss_applies_min_length():
    learner = vsml_learner(CFG)
    params = learner.init_params(jax.random.PRNGKey(0))
    data, key = _data(), jax.random.PRNGKey(7)
    spec = objective.EpisodeSpec(length=8, batch=2, min_length=2)
    loss, _ = objective.episode_batch_loss(learner, params, key, data, spec)
    k_data, k_state = jax.random.split(key)
    episodes = objective.sample_batch(k_data, data, spec)
    expected, _ = objective.episodes_loss(learner, params, k_state, episodes,
                                          step_weights=objective.length_weights(8, 2))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="min_length"):
        objective.EpisodeSpec(length=8, batch=2, min_length=9)


def test_meta_train_config_checks_min_length():
    with pytest.raises(ValueError, match="min_length"):
        MetaTrainConfig(episode_length=100, min_length=101)
    with pytest.raises(ValueError, match="min_length"):
        MetaTrainConfig(episode_length=100, min_length=10, meta_optimizer="cma_es")
    assert MetaTrainConfig(episode_length=100, min_length=10).min_length == 10


# ------------------------------------------- pixel permutation for VS-ML
def test_tied_vsml_layer_is_equivariant_to_pixel_permutations():
    """A tied VS-ML layer without coordinates and with zero initial states (the
    nearest-mean clone's init_std=0) gives the same predictions whatever the
    order of its inputs: a pixel permutation is no new task for it."""
    cfg = dataclasses.replace(CFG, init_std=0.0)
    learner = vsml_learner(cfg)
    params = learner.init_params(jax.random.PRNGKey(0))
    data = _data()
    x, y = objective.sample_batch(jax.random.PRNGKey(1), data,
                                  objective.EpisodeSpec(length=30, batch=1))
    perm = np.random.default_rng(0).permutation(6)
    state = learner.init_state(jax.random.PRNGKey(2))
    _, out = learner.unroll(params, state, (x[0], y[0]))
    _, out_perm = learner.unroll(params, state, (x[0][:, perm], y[0]))
    np.testing.assert_allclose(out.logits, out_perm.logits, rtol=1e-4, atol=1e-5)
    # With coordinates the cells know their position: the order matters.
    cfg_xy = dataclasses.replace(cfg, coordinates=True)
    learner_xy = vsml_learner(cfg_xy)
    params_xy = learner_xy.init_params(jax.random.PRNGKey(0))
    state_xy = learner_xy.init_state(jax.random.PRNGKey(2))
    _, a = learner_xy.unroll(params_xy, state_xy, (x[0], y[0]))
    _, b = learner_xy.unroll(params_xy, state_xy, (x[0][:, perm], y[0]))
    assert not np.allclose(a.logits, b.logits, rtol=1e-4, atol=1e-5)
