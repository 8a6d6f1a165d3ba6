"""Gradient accumulation (--micro_batch): the same gradient as the whole batch at once.

The batch of episodes is run in groups inside the jitted step and the group
gradients are averaged; with groups of equal size that is the batch mean, so
only float reassociation may differ. Checked without a mesh and with the
batch split over 2 and 4 of the conftest's CPU devices.
"""
import jax
import numpy as np
import pytest

import vsml_jax
from vsml_jax.learners import vsml_learner
from vsml_jax.meta import gradient, sharding
from vsml_jax.meta.objective import EpisodeSpec, episode_batch_loss
from vsml_jax.runs.meta_train import MetaTrainConfig

CFG = vsml_jax.VSMLConfig(layer_sizes=(6, 3), hidden_size=4, msg_size=2, micro_ticks=1,
                          readout_scale=5.0)
SPEC = EpisodeSpec(length=10, batch=8)


def _leaves(tree):
    return [np.asarray(x, np.float32) for x in jax.tree_util.tree_leaves(tree)]


def _close(a, b):
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("devices,micro_batches", [(0, 4), (0, 8), (2, 2), (4, 2)])
def test_accumulated_gradient_equals_the_whole_batch_gradient(clusters, devices,
                                                              micro_batches):
    learner = vsml_learner(CFG, remat=True)
    params = learner.init_params(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(5)
    mesh = sharding.device_mesh(jax.devices()[:devices]) if devices else None
    whole = jax.jit(jax.value_and_grad(
        lambda p: episode_batch_loss(learner, p, key, clusters, SPEC, mesh), has_aux=True))
    parts = jax.jit(lambda p: gradient.accumulated_loss_and_grad(
        learner, p, key, clusters, SPEC, micro_batches, mesh))
    (loss, metrics), grads = whole(params)
    (loss_m, metrics_m), grads_m = parts(params)
    np.testing.assert_allclose(float(loss_m), float(loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics_m["accuracy"]), float(metrics["accuracy"]),
                               rtol=1e-5)
    _close(grads_m, grads)
    assert max(np.abs(g).max() for g in _leaves(grads)) > 0  # a gradient to compare


def test_micro_batched_steps_train_the_same_learner(clusters):
    learner = vsml_learner(CFG, remat=True)
    optimizer = gradient.make_optimizer("adam", 3e-2, 1.0)
    mesh = sharding.device_mesh(jax.devices()[:2])
    results = []
    for micro_batch in (0, 2):
        init_fn = gradient.make_init_fn(learner, optimizer, seed=0)
        step = gradient.make_step(learner, optimizer, clusters, SPEC, mesh,
                                  micro_batch=micro_batch)
        state = jax.jit(init_fn, out_shardings=sharding.replicated(mesh))()
        for _ in range(3):
            state, metrics = step(state)
        results.append((state.params, float(metrics["loss"]), float(metrics["grad_norm"])))
    _close(results[1][0], results[0][0])
    np.testing.assert_allclose(results[1][1:], results[0][1:], rtol=1e-5)


def test_the_step_program_places_no_data_until_it_runs(clusters):
    learner = vsml_learner(CFG)
    optimizer = gradient.make_optimizer("adam", 3e-2, 1.0)
    mesh = sharding.device_mesh(jax.devices()[:2])
    step = gradient.make_step(learner, optimizer, clusters, SPEC, mesh, micro_batch=4)
    assert step.data is clusters and step._placed is None
    # It lowers from shapes alone (as for devices that are not there).
    spec = lambda t, s: jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), t)
    state = spec(jax.eval_shape(gradient.make_init_fn(learner, optimizer, 0)),
                 sharding.replicated(mesh))
    text = step.jitted.lower(state, spec(step.data, step.data_sharding())).as_text()
    assert "while" in text or "scan" in text  # the loop over micro-batches


def test_a_micro_batch_that_does_not_split_is_a_clear_error(clusters):
    learner = vsml_learner(CFG)
    optimizer = gradient.make_optimizer("adam", 3e-2, 1.0)
    mesh = sharding.device_mesh(jax.devices()[:4])
    with pytest.raises(ValueError, match=r"--micro_batch=2 must divide --batch_size=8 and "
                                         r"be a multiple of the 4 devices.*valid: 4, 8"):
        gradient.make_step(learner, optimizer, clusters, SPEC, mesh, micro_batch=2)
    with pytest.raises(ValueError, match=r"--micro_batch=3: .*divide --batch_size=8"):
        MetaTrainConfig(batch_size=8, micro_batch=3)
    with pytest.raises(ValueError, match=r"evolution strategies use --member_batch"):
        MetaTrainConfig(batch_size=8, micro_batch=4, meta_optimizer="cma_es")
