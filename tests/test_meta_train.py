"""Meta-optimisers (Adam, CMA-ES, OpenAI-ES), population sharding, the entry point."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vsml_jax
from vsml_jax.learners import vsml_learner
from vsml_jax.meta import evolution, gradient, sharding
from vsml_jax.meta.objective import EpisodeSpec, episodes_loss, sample_batch
from vsml_jax.training import checkpointing, loop

CFG = vsml_jax.VSMLConfig(layer_sizes=(6, 3), hidden_size=4, msg_size=2, micro_ticks=1,
                          readout_scale=5.0)
SPEC = EpisodeSpec(length=10, batch=4)



@pytest.fixture(scope="module")
def fixed_eval(clusters):
    """Meta-loss of params on one fixed batch of 16 episodes (keys unused in training)."""
    learner = vsml_learner(CFG)
    episodes = sample_batch(jax.random.PRNGKey(777), clusters, EpisodeSpec(10, 16))
    loss = jax.jit(lambda p: episodes_loss(learner, p, jax.random.PRNGKey(778),
                                           episodes)[0])
    return lambda p: float(loss(p))


@pytest.fixture(scope="module")
def adam_run(clusters):
    """init_fn and jitted step_fn of BPTT+Adam (with remat), shared by the tests."""
    learner = vsml_learner(CFG, remat=True)
    optimizer = gradient.make_optimizer("adam", 3e-2, 1.0)
    return (gradient.make_init_fn(learner, optimizer, seed=0),
            gradient.make_step_fn(learner, optimizer, clusters, SPEC))


def test_adam_lowers_meta_loss(adam_run, fixed_eval):
    init_fn, step_fn = adam_run
    state = init_fn()
    before = fixed_eval(state.params)
    for _ in range(40):
        state, metrics = step_fn(state)
    after = fixed_eval(state.params)
    assert int(state.step) == 40 and np.isfinite(float(metrics["grad_norm"]))
    assert after < before - 0.1, (before, after)


def _run(workdir, adam_run, num_steps):
    init_fn, step_fn = adam_run
    # Any function of the state serves as a (cheap) evaluation for the loop.
    eval_fn = lambda state: {"eval/norm": {"param_norm": optax.tree.norm(state.params)}}
    return loop.run(str(workdir), init_fn, step_fn, num_steps,
                    config_dict={"lr": 3e-2, "num_steps": num_steps},
                    checkpoint_every=2, log_every=2, eval_fn=eval_fn, eval_every=3).state


def test_resume_is_bit_identical(tmp_path, adam_run):
    straight = _run(tmp_path / "a", adam_run, 8)
    _run(tmp_path / "b", adam_run, 5)  # "interrupted" after step 5
    # Progress after the last periodic checkpoint is lost, as after a crash:
    # drop step 5's (final) checkpoint so the resume starts from step 4.
    mgr = checkpointing.make_manager(str(tmp_path / "b" / loop.CHECKPOINT_DIR))
    assert checkpointing.latest_step(mgr) == 5
    mgr.delete(5)
    mgr.close()
    resumed = _run(tmp_path / "b", adam_run, 8)

    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ma, mb = loop.read_metrics(tmp_path / "a"), loop.read_metrics(tmp_path / "b")
    assert ma == mb
    assert [r["step"] for r in ma if r["split"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in ma if r["split"] == "eval/norm"] == [3, 6, 8]
    assert set(ma[3]) == {"step", "split", "param_norm"}


@pytest.mark.parametrize("name,kwargs", [("cma_es", {}), ("open_es", {"es_lr": 0.05})])
def test_evolution_lowers_meta_loss(name, kwargs, clusters, fixed_eval):
    learner = vsml_learner(CFG)
    init = learner.init_params(jax.random.PRNGKey(0))
    strategy, es_params = evolution.make_strategy(name, 8, init, sigma_init=0.1, **kwargs)
    state = evolution.make_init_fn(learner, strategy, es_params, seed=0,
                                   init_params=init)()
    step_fn = evolution.make_step_fn(learner, strategy, es_params, clusters, SPEC)
    before = fixed_eval(evolution.mean_params(strategy, state))
    for _ in range(20):
        state, metrics = step_fn(state)
    after = fixed_eval(evolution.mean_params(strategy, state))
    assert before == pytest.approx(fixed_eval(init))  # the search starts at init
    assert after < before - 0.1, (name, before, after)
    assert float(metrics["best_loss"]) <= float(metrics["pop_loss"])


def _population_problem(clusters, strategy_name: str, popsize: int):
    """(learner, a population asked from a real evosax strategy, state key, episodes)."""
    learner = vsml_learner(CFG)
    init = learner.init_params(jax.random.PRNGKey(0))
    strategy, es_params = evolution.make_strategy(strategy_name, popsize, init,
                                                  sigma_init=0.1)
    s = strategy.init(jax.random.PRNGKey(1), init, es_params)
    population, _ = strategy.ask(jax.random.PRNGKey(2), s, es_params)
    inputs, labels = sample_batch(jax.random.PRNGKey(3), clusters, SPEC)
    return learner, population, jax.random.PRNGKey(4), inputs, labels


def test_sharded_population_fitness_equals_unsharded(clusters):
    assert jax.device_count() == 8, "conftest should provide 8 CPU devices"
    learner, population, key, inputs, labels = _population_problem(clusters, "open_es", 16)

    fn = lambda pop, k, x, y: evolution.population_fitness(learner, pop, k, (x, y))
    plain = jax.jit(fn)(population, key, inputs, labels)
    mesh = sharding.device_mesh()
    sharded_fn = jax.jit(sharding.shard_population(fn, mesh))
    sharded = sharded_fn(population, key, inputs, labels)
    assert len(sharded[0].sharding.device_set) == 8
    # Each member runs the same program; only XLA's fusion for a different
    # vmap width may round differently (observed: <= 2 ulp), hence rtol 1e-6.
    np.testing.assert_allclose(np.asarray(sharded[0]), np.asarray(plain[0]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(plain[1]), np.asarray(sharded[1]))
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        sharding.check_population_size(12, mesh)


def test_member_batch_gives_the_same_fitness_as_vmap(clusters):
    # lax.map over members (the CPU default) must not change what ES sees.
    learner, population, key, inputs, labels = _population_problem(clusters, "cma_es", 6)
    fit = jax.jit(evolution.population_fitness, static_argnums=(0, 4))
    vmapped = fit(learner, population, key, (inputs, labels), None)
    assert float(jnp.std(vmapped[0])) > 0  # members differ, so a mix-up would show
    for member_batch in (1, 4):  # 4 does not divide 6: lax.map pads the remainder
        mapped = fit(learner, population, key, (inputs, labels), member_batch)
        np.testing.assert_allclose(np.asarray(mapped[0]), np.asarray(vmapped[0]), rtol=1e-6)
    assert evolution.default_member_batch("cpu") == 1
    assert evolution.default_member_batch("tpu") is None


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="cma_es"):
        evolution.strategy_class("cmaes_typo")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _meta_train(*args, devices=1):
    """Runs `python -m experiments.meta_train` in a fresh process (own absl flags)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.meta_train", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_bad_flag_values_are_rejected(tmp_path):
    for bad, message in (("--popsize=0", "--popsize=0 must be >= 2"),
                         # A negative final fraction would make the schedule ascend.
                         ("--lr_final_fraction=-1", "--lr_final_fraction=-1.0 must be in [0, 1]"),
                         ("--lr=nan", "--lr=nan must be a positive number"),
                         ("--batch_size=0", "--batch_size=0 must be >= 1")):
        result = _meta_train(f"--workdir={tmp_path}", bad)
        assert result.returncode != 0
        assert message in result.stderr, result.stderr
        # The message, not pages of flag help.
        assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
    assert not os.path.exists(tmp_path / "config.json")


def test_entry_point_writes_portable_learner(tmp_path):
    workdir = str(tmp_path / "run")
    result = _meta_train(
        f"--workdir={workdir}", "--dataset=synthetic", "--pool=4", "--synthetic_size=40",
        "--hidden_size=2", "--msg_size=2", "--micro_ticks=1", "--episode_length=5",
        "--batch_size=2", "--meta_optimizer=open_es", "--popsize=8", "--num_steps=2",
        "--checkpoint_every=1", "--log_every=1", devices=8)
    assert result.returncode == 0, result.stderr[-3000:]
    params, cfg, info = checkpointing.load_vsml_learner(workdir)
    assert cfg.layer_sizes == (49, 10) and cfg.hidden_size == 2
    assert info["meta_training"]["steps"] == 2
    assert info["meta_training"]["meta_optimizer"] == "open_es"
    assert np.isfinite(info["meta_training"]["final_meta_loss"])
    assert info["flags"]["popsize"] == 8 and info["input"]["pool"] == 4
    assert json.load(open(os.path.join(workdir, "config.json")))["dataset"] == "synthetic"
    assert [r["step"] for r in loop.read_metrics(workdir)] == [1, 2]

    # Continuing from it takes the architecture from the checkpoint (the flags
    # left at their defaults would say hidden_size=16, micro_ticks=2) ...
    data_flags = ("--dataset=synthetic", "--pool=4", "--synthetic_size=40")
    cont = str(tmp_path / "cont")
    result = _meta_train(f"--workdir={cont}", f"--init_checkpoint={workdir}", *data_flags,
                         "--episode_length=5", "--batch_size=2", "--num_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    _, cont_cfg, _ = checkpointing.load_vsml_learner(cont)
    assert (cont_cfg.hidden_size, cont_cfg.msg_size, cont_cfg.micro_ticks) == (2, 2, 1)
    # ... and refuses an architecture flag that contradicts it.
    clash = _meta_train(f"--workdir={tmp_path / 'clash'}", f"--init_checkpoint={workdir}",
                        "--hidden_size=3", *data_flags)
    assert clash.returncode != 0
    assert "--hidden_size=3 (checkpoint: 2)" in clash.stderr


def test_meta_rnn_continues_in_its_checkpoint_architecture(tmp_path):
    data_flags = ("--learner=meta_rnn", "--dataset=synthetic", "--pool=4",
                  "--synthetic_size=40", "--episode_length=5", "--batch_size=2",
                  "--num_steps=1", "--checkpoint_every=1")
    first = str(tmp_path / "first")
    result = _meta_train(f"--workdir={first}", "--hidden_size=4", *data_flags)
    assert result.returncode == 0, result.stderr[-3000:]
    # Without --hidden_size the flag default (16) would not fit the stored weights.
    cont = str(tmp_path / "cont")
    result = _meta_train(f"--workdir={cont}", f"--init_checkpoint={first}", *data_flags)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.load(open(os.path.join(cont, "learner.json")))
    assert info["learner"] == "meta_rnn" and info["config"]["hidden_size"] == 4
    clash = _meta_train(f"--workdir={tmp_path / 'clash'}", f"--init_checkpoint={first}",
                        "--hidden_size=5", *data_flags)
    assert clash.returncode != 0
    assert "--hidden_size=5 (checkpoint: 4)" in clash.stderr


@pytest.mark.parametrize("name", ["cma_es", "open_es"])
def test_evolution_runs_in_bfloat16(name, clusters):
    """The strategies sample float32; members are cast to the learner's bfloat16."""
    cfg = vsml_jax.VSMLConfig(layer_sizes=(6, 3), hidden_size=4, msg_size=2, micro_ticks=1,
                              readout_scale=5.0, dtype="bfloat16")
    learner = vsml_learner(cfg)
    init = learner.init_params(jax.random.PRNGKey(0))
    strategy, es_params = evolution.make_strategy(name, 4, init, sigma_init=0.1)
    state = evolution.make_init_fn(learner, strategy, es_params, seed=0, init_params=init)()
    step_fn = evolution.make_step_fn(learner, strategy, es_params, clusters, SPEC)
    for _ in range(2):
        state, metrics = step_fn(state)
    assert np.isfinite(float(metrics["pop_loss"]))
    mean = evolution.mean_params(strategy, state, learner)
    assert {x.dtype for x in jax.tree_util.tree_leaves(mean)} == {
        x.dtype for x in jax.tree_util.tree_leaves(init)}
