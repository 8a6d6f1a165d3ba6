"""Data parallelism inside one process: 1, 2, 4 or 8 devices, the same learner.

The batch of episodes (BPTT), the population (ES) and the cloned cells are
split over a mesh of the conftest's 8 CPU devices; only float reassociation
of the reductions may differ. Multi-process jobs: test_multiprocess.py.
"""
import jax
import numpy as np
import pytest

import vsml_jax
from vsml_jax import hlo_stats
from vsml_jax.learners import vsml_learner
from vsml_jax.meta import evolution, gradient, sharding
from vsml_jax.meta.objective import EpisodeSpec, episodes_loss, sample_batch
from vsml_jax.runs.clone import CloneConfig, _build

CFG = vsml_jax.VSMLConfig(layer_sizes=(6, 3), hidden_size=4, msg_size=2, micro_ticks=1,
                          readout_scale=5.0)
DEVICE_COUNTS = (1, 2, 4, 8)



def _run(init_fn, step_fn, mesh, steps):
    state = jax.jit(init_fn, out_shardings=sharding.replicated(mesh))()
    for _ in range(steps):
        state, metrics = step_fn(state)
    return state, metrics


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _assert_same(results):
    base = results[0]
    for other in results[1:]:
        for a, b in zip(base, other):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_meta_gradient_is_the_same_on_1_2_8_devices(clusters):
    # The gradient itself, not only Adam's (scale-free) steps: a mean counted
    # twice or a gradient summed instead of averaged would show here.
    learner = vsml_learner(CFG)
    params = learner.init_params(jax.random.PRNGKey(0))
    episodes = sample_batch(jax.random.PRNGKey(2), clusters, EpisodeSpec(10, 8))
    key = jax.random.PRNGKey(3)
    grads = []
    for n in (1, 2, 8):
        mesh = sharding.device_mesh(jax.devices()[:n])
        loss = lambda p: episodes_loss(learner, p, key, episodes, mesh)[0]
        grads.append(_leaves(jax.jit(jax.grad(loss))(params)))
    _assert_same(grads)


def test_bptt_on_1_2_4_8_devices_gives_the_same_learner(clusters):
    learner = vsml_learner(CFG)
    optimizer = gradient.make_optimizer("adam", 3e-2, 1.0)
    spec = EpisodeSpec(length=10, batch=8)
    results = []
    for n in DEVICE_COUNTS:
        mesh = sharding.device_mesh(jax.devices()[:n])
        state, metrics = _run(gradient.make_init_fn(learner, optimizer, seed=0),
                              gradient.make_step_fn(learner, optimizer, clusters, spec,
                                                    mesh), mesh, 3)
        leaf = jax.tree_util.tree_leaves(state.params)[0]
        assert len(leaf.sharding.device_set) == n  # replicated on the mesh
        results.append(_leaves(state.params))
    _assert_same(results)
    assert not np.array_equal(results[0][0], _leaves(learner.init_params(
        jax.random.split(jax.random.PRNGKey(0))[0]))[0])  # it did learn something


def test_evolution_on_1_and_8_devices_gives_the_same_learner(clusters):
    learner = vsml_learner(CFG)
    init = learner.init_params(jax.random.PRNGKey(0))
    strategy, es_params = evolution.make_strategy("open_es", 8, init, sigma_init=0.1)
    spec = EpisodeSpec(length=10, batch=2)
    results = []
    for n in (1, 8):  # (each count compiles anew; BPTT covers 2 and 4)
        mesh = sharding.device_mesh(jax.devices()[:n])
        state, _ = _run(evolution.make_init_fn(learner, strategy, es_params, seed=0),
                        evolution.make_step_fn(learner, strategy, es_params, clusters,
                                               spec, mesh), mesh, 3)
        results.append(_leaves(evolution.mean_params(strategy, state)))
    _assert_same(results)


@pytest.mark.parametrize("stage", ["backprop", "nearest_mean"])
def test_cloning_on_1_and_8_devices_gives_the_same_learner(stage):
    extra = dict(eval_long_steps=2) if stage == "backprop" else {}
    c = CloneConfig(stage=stage, hidden_size=4, msg_size=4, micro_ticks=1,
                    meta_test_layer_sizes=(4, 2), batch_size=16, unroll_steps=2,
                    eval_cells=8, **extra)
    spec, cfg = c.spec(), c.vsml_config()
    results, losses = [], []
    for n in (1, 8):
        mesh = sharding.device_mesh(jax.devices()[:n])
        init_fn, step_fn, _, shardings = _build(c, cfg, spec, mesh)
        state = jax.jit(init_fn, out_shardings=shardings)()
        if n > 1:
            # Each device unrolls its own cells: the gradient of V_M is summed
            # once per step, not in every step of the unroll (a collective in
            # a loop body would cross the network unroll_steps times).
            text = step_fn.lower(state).compile().as_text()
            colls = hlo_stats.collectives(text)
            assert colls and not [k for k in colls if k.in_loop], colls
        for _ in range(3):
            state, metrics = step_fn(state)
        assert len(state["chains"].w.sharding.device_set) == n  # cells split over devices
        results.append(_leaves(state["train"]))
        losses.append(float(metrics["loss"]))
    _assert_same(results)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_batch_that_does_not_divide_the_devices_is_a_clear_error(clusters):
    mesh = sharding.device_mesh(jax.devices()[:8])
    learner = vsml_learner(CFG)
    optimizer = gradient.make_optimizer("adam", 3e-2, 1.0)
    with pytest.raises(ValueError, match=r"--batch_size=12 must be a multiple of the 8 "
                                         r"devices.*--batch_size=8 or 16"):
        gradient.make_step_fn(learner, optimizer, clusters, EpisodeSpec(10, 12), mesh)
