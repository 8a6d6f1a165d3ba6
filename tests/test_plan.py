"""The planner compiles real runs for TPU slices (and NVIDIA GPUs) without the hardware.

Deviceless compilation needs a process whose JAX backend is the CPU with the
TPU/GPU compiler variables set before JAX starts, so every compile runs in
one fresh subprocess per test module (`planned`), not in the pytest worker
(which has its own 8-device CPU backend). The programs are the quick-start
shapes (7x7 inputs, short episodes) so that the whole module stays short.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import vsml_jax
from vsml_jax import accelerators

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The quick-start run (quickstart.flags), shorter episodes and meta-tests.
QUICK = dict(dataset="mnist", pool=4, hidden_size=16, msg_size=8, micro_ticks=1,
             readout_scale=10.0, episode_length=50, batch_size=8, eval_length=100,
             eval_episodes=2)
ES = dict(QUICK, hidden_size=8, msg_size=4, episode_length=20, batch_size=4,
          meta_optimizer="open_es", popsize=8)

# case: (config kwargs, target, programs)
CASES = {
    # One host of 2x2 v5e chips: the BPTT step and its meta-test unroll, ...
    "bptt_v5e_2x2": (QUICK, "tpu-v5e-4", ["bptt_step", "meta_test"]),
    # ... the same step accumulating the gradient over 4 micro-batches, ...
    "micro_v5e_2x2": (dict(QUICK, batch_size=16, micro_batch=4), "tpu-v5e-4",
                      ["bptt_step"]),
    # ... and an ES generation, the population split over the chips.
    "es_v5e_2x2": (ES, "tpu-v5e-4", ["es_generation"]),
    # Two hosts: v4 2x2x2 (Cloud name v4-16), 8 chips, 4 per host.
    "bptt_two_hosts": (QUICK, "tpu-v4-16", ["bptt_step", "meta_test"]),
    "es_two_hosts": (ES, "tpu-v4-16", ["es_generation"]),
}
GPU_CASE = (QUICK, "gpu-h200x2", ["bptt_step"])

SCRIPT = r"""
import json, sys
from vsml_jax.runs.plan import plan
from vsml_jax.runs.meta_train import MetaTrainConfig
cases = json.loads(sys.argv[1])
out = {}
for name, (kwargs, target, programs) in cases.items():
    report = plan(MetaTrainConfig(data_dir=sys.argv[2], **kwargs), target,
                  programs=programs)
    out[name] = report.to_dict()
print("JSON:" + json.dumps(out))
"""


def _libtpu_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("libtpu") is not None


@pytest.fixture(scope="module")
def planned(data_dir):
    if not _libtpu_installed():
        pytest.fail("libtpu is not installed: pip install -e '.[tpu-aot]' (CI installs it).")
    cases = dict(CASES)
    if accelerators.cuda_plugin_installed():
        cases["bptt_h200x2"] = GPU_CASE
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases), data_dir],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("JSON:")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][5:])


@pytest.mark.parametrize("case", sorted(CASES))
def test_programs_fit_without_collectives_in_time_loops(planned, case):
    report = planned[case]
    assert [p["name"] for p in report["programs"]] == CASES[case][2]
    for p in report["programs"]:
        assert p["fits"], p
        assert 0 < p["device_memory_bytes"] <= p["device_capacity_bytes"]
        # Each time step must stay on its device: a collective in a loop body
        # would cross the network T times per episode.
        assert p["collectives_in_loops"] == 0, p["collectives"]
        assert p["kernels_per_time_step"] and all(k > 0 for k in p["kernels_per_time_step"])
        assert p["flops"] > 0 and p["step_time_lower_bound_s"] > 0  # TPU cost analysis
    # The time loops run T (or T / remat chunk) times: the compiler kept them.
    T = CASES[case][0]["episode_length"]
    assert T in [l["trip_count"] for l in report["programs"][0]["loops"]]


def test_data_parallel_step_all_reduces_once_per_step(planned):
    for case in ("bptt_v5e_2x2", "bptt_two_hosts", "micro_v5e_2x2"):
        step = planned[case]["programs"][0]
        assert step["collectives"]["by_kind"]["all-reduce"]["count"] >= 1, step
        assert step["collectives"]["in_loops"] == 0
    # The meta-test is replicated: no collectives at all.
    assert planned["bptt_v5e_2x2"]["programs"][1]["collectives"]["count"] == 0


def test_es_generation_gathers_no_population(planned):
    # The population is sampled on every device from the replicated strategy
    # state; only the fitness [P] crosses the network, once per generation.
    for case in ("es_v5e_2x2", "es_two_hosts"):
        colls = planned[case]["programs"][0]["collectives"]
        assert "all-gather" not in colls["by_kind"], colls
        assert colls["bytes"] < 4096, colls


def test_micro_batches_run_in_one_loop_of_the_step(planned):
    # --micro_batch=4 of 16 episodes: a loop of 4 micro-batches, each with the
    # time loops inside; the gradient is all-reduced after it, not per micro-batch.
    loops = planned["micro_v5e_2x2"]["programs"][0]["loops"]
    assert 4 in [l["trip_count"] for l in loops], loops
    whole = planned["bptt_v5e_2x2"]["programs"][0]
    micro = planned["micro_v5e_2x2"]["programs"][0]
    # Twice the batch in micro-batches of half of it: no more temporaries.
    assert micro["memory"]["temporaries"] <= 1.1 * whole["memory"]["temporaries"]


def test_micro_batch_accumulation_equals_the_whole_batch(clusters):
    # The accumulated gradient is the whole batch's (tests/test_micro_batch.py
    # covers more device counts and the training step).
    from vsml_jax.learners import vsml_learner
    from vsml_jax.meta import gradient, sharding
    from vsml_jax.meta.objective import EpisodeSpec, episode_batch_loss
    learner = vsml_learner(vsml_jax.VSMLConfig(layer_sizes=(6, 3), hidden_size=4,
                                               msg_size=2, micro_ticks=1), remat=True)
    params = learner.init_params(jax.random.PRNGKey(0))
    key, spec = jax.random.PRNGKey(1), EpisodeSpec(length=8, batch=8)
    mesh = sharding.device_mesh(jax.devices()[:2])
    whole = jax.jit(jax.grad(lambda p: episode_batch_loss(learner, p, key, clusters, spec,
                                                         mesh)[0]))(params)
    parts = jax.jit(lambda p: gradient.accumulated_loss_and_grad(
        learner, p, key, clusters, spec, 2, mesh)[1])(params)
    for a, b in zip(jax.tree_util.tree_leaves(parts), jax.tree_util.tree_leaves(whole)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)


def test_target_table():
    t = accelerators.get("tpu-v5e-32")
    assert (t.num_devices, t.shape, t.hosts, t.topology_name) == (32, (4, 8), 8, "v5e:4x8")
    t = accelerators.get("tpu-v4-8")  # Cloud TPU counts v4 TensorCores: 4 chips
    assert (t.num_devices, t.hosts, t.chip.megacore) == (4, 1, True)
    assert accelerators.get("tpu-v5e-8").hosts == 1
    assert accelerators.get("tpu-v4-16").hosts == 2
    assert accelerators.get("gpu-h200x8").topology_name == "1x1x8"
    assert all(accelerators.get(n).num_devices >= 1 for n in accelerators.known_targets())


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(accelerators.UnknownTargetError, match="tpu-v5e-N.*gpu-h200"):
        accelerators.get("tpu-v9-8")
    proc = subprocess.run([sys.executable, "-m", "experiments.plan", "--target=tpu-v5e-3",
                           "--flagfile=experiments/configs/quickstart.flags"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert "unknown target 'tpu-v5e-3'" in err[-2] and "gpu-h100" in err[-2], err
    assert "Traceback" not in proc.stderr


def test_gpu_target(planned):
    if "bptt_h200x2" not in planned:
        pytest.skip("the CUDA plugin is not installed (pip install -e '.[gpu-aot]'); "
                    "GPU targets are planned only where it is.")
    for p in planned["bptt_h200x2"]["programs"]:
        assert p["fits"] and p["collectives_in_loops"] == 0
        assert p["kernels_per_time_step"]
        assert p["flops"] is None  # the GPU compiler reports no cost analysis
