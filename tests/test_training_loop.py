"""The generic training loop (NaN stop, config checks) and portable learner files.

Resuming a real meta-training run bit-identically is tested in test_meta_train.py.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vsml_jax
from vsml_jax.training import checkpointing, loop

CFG = vsml_jax.VSMLConfig(layer_sizes=(6, 3), hidden_size=4, msg_size=2, micro_ticks=1,
                          readout_scale=5.0)


def _counter_step(state):
    """A toy step: w <- w + noise from the state's key (checks key handling too)."""
    key, sub = jax.random.split(state["key"])
    w = state["w"] + jax.random.normal(sub, state["w"].shape)
    return {"w": w, "key": key}, {"loss": jnp.mean(w ** 2)}


def _run(workdir, num_steps, config):
    init_fn = lambda: {"w": jnp.zeros((3,)), "key": jax.random.PRNGKey(0)}
    return loop.run(str(workdir), init_fn, jax.jit(_counter_step), num_steps,
                    config_dict=config, checkpoint_every=2, log_every=2)


def test_config_mismatch_refused(tmp_path):
    _run(tmp_path, 2, {"lr": 1e-2, "batch": 2, "num_steps": 2})
    with pytest.raises(loop.ConfigMismatchError) as err:
        _run(tmp_path, 4, {"lr": 1e-3, "batch": 2, "num_steps": 4})
    msg = str(err.value)
    assert "lr: 0.01 -> 0.001" in msg and "batch" not in msg and "--workdir" in msg
    # num_steps is safe to change: extending the run works.
    _run(tmp_path, 4, {"lr": 1e-2, "batch": 2, "num_steps": 4})
    assert json.load(open(tmp_path / loop.CONFIG_FILE))["num_steps"] == 4


def _exploding_step(state):
    """w grows x1e15 per step: float32 overflows to inf at step 3 (1e45)."""
    w = state["w"] * 1e15
    return {"w": w, "key": state["key"]}, {"loss": jnp.sum(w)}


def test_nan_stops_and_last_checkpoint_is_intact(tmp_path):
    init_fn = lambda: {"w": jnp.ones((2,), jnp.float32), "key": jax.random.PRNGKey(0)}
    with pytest.raises(FloatingPointError) as err:
        loop.run(str(tmp_path), init_fn, jax.jit(_exploding_step), 10, config_dict={},
                 checkpoint_every=2, log_every=1)
    msg = str(err.value)
    # Step 2 holds w = 1e30 (its loss, that of step 3, is inf): not suggested.
    assert "at step 3" in msg and "steps [2]" in msg and "from step 0" in msg
    assert str(tmp_path) in msg
    mgr = checkpointing.make_manager(str(tmp_path / loop.CHECKPOINT_DIR))
    assert checkpointing.latest_step(mgr) == 2
    restored = checkpointing.restore(mgr, 2, init_fn())
    np.testing.assert_allclose(np.asarray(restored["w"]), 1e30, rtol=1e-6)
    assert [r["step"] for r in loop.read_metrics(tmp_path)] == [1, 2]


def test_nonfinite_state_is_never_saved(tmp_path):
    # The loss is from before the update (finite), the new state is inf.
    def step(state):
        return {"w": state["w"] * 1e30}, {"loss": jnp.sum(state["w"])}
    init_fn = lambda: {"w": jnp.ones((2,), jnp.float32)}
    with pytest.raises(FloatingPointError, match="step 2 contains NaN/inf and was not saved"):
        loop.run(str(tmp_path), init_fn, jax.jit(step), 5, config_dict={},
                 checkpoint_every=2, log_every=1)
    mgr = checkpointing.make_manager(str(tmp_path / loop.CHECKPOINT_DIR))
    assert checkpointing.latest_step(mgr) is None


def test_portable_learner_round_trip(tmp_path):
    params = vsml_jax.init_params(jax.random.PRNGKey(1), CFG)
    cfg_dict = checkpointing.vsml_config_to_dict(CFG)
    checkpointing.save_learner(str(tmp_path / "tiny"), params, cfg_dict,
                               {"meta_training": {"steps": 3}})
    checkpointing.save_learner_dir(str(tmp_path / "run"), params, cfg_dict)
    for path in (tmp_path / "tiny", tmp_path / "run"):
        loaded, cfg, info = checkpointing.load_vsml_learner(str(path))
        assert cfg == CFG and loaded.cfg == CFG
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert info["learner"] == "vsml" and info["config"]["layer_sizes"] == [6, 3]
    with pytest.raises(FileNotFoundError, match="params.msgpack"):
        checkpointing.load_learner(str(tmp_path / "missing"))
