"""impl="pallas" (vsml_jax.pallas_grid) equals impl="fast" and impl="reference".

The kernels run in Pallas' interpret mode on the CPU here: both bodies (the
TPU one through `layer_ticks`/`unroll`, the GPU one called directly) are
checked against the XLA kernels, forward and reverse, on grids with an odd A
and B = 10 (not a power of two). The last tests compile a small unroll for a
TPU (and an NVIDIA GPU where the CUDA plugin imports) without the hardware
and look for the Pallas kernels in the time loop.
"""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsml_jax import accelerators, grid, hlo_stats, pallas_grid
from vsml_jax.config import VSMLConfig
from vsml_jax.network import meta_loss, unroll
from vsml_jax.params import init_params
from vsml_jax.state import init_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Odd A, B = 10, two ticks, a clip that binds for some cells.
CFG = VSMLConfig(layer_sizes=(7, 10), hidden_size=4, msg_size=3, micro_ticks=2,
                 state_clip=0.6)


def _inputs(A, B, H, seed=0, lead=()):
    k = jax.random.split(jax.random.PRNGKey(seed), 7)
    n = lambda i, *s: jax.random.normal(k[i], lead + s)
    return (jax.random.normal(k[0], (H, 4 * H)), n(1, A, 4 * H), n(2, B, 4 * H),
            n(3, A, B, H), n(4, A, B, H), n(5, A, B, H), jnp.cos(n(6, A, B, H)))


def _close(a, b, tol=2e-5):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.shape == y.shape
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_ticks_and_their_reverse_equal_the_xla_kernel_under_vmap():
    w_h, pa, pb, h, c, dh, dc = _inputs(7, 10, 4, lead=(3,))
    fast = jax.vmap(lambda *a: grid._lstm_ticks(CFG, w_h, *a))
    ours = jax.vmap(lambda *a: pallas_grid.lstm_ticks(CFG, w_h, *a))
    _close(ours(pa, pb, h, c), fast(pa, pb, h, c))
    # The clip binds somewhere (else its reverse would be untested).
    assert float(jnp.max(jnp.abs(fast(pa, pb, h, c)[1]))) == pytest.approx(0.6)

    def loss(fn):
        return lambda w, pa, pb, h, c: sum(
            jnp.sum(jnp.sin(x) * y) for x, y in zip(
                jax.vmap(lambda *a: fn(CFG, w, *a))(pa, pb, h, c), (dh, dc)))
    args = (w_h, pa, pb, h, c)
    _close(jax.grad(loss(pallas_grid.lstm_ticks), argnums=range(5))(*args),
           jax.grad(loss(grid._lstm_ticks), argnums=range(5))(*args))


def test_fused_step_and_its_reverse_equal_the_xla_ops_under_vmap():
    # Projections + ticks + forward message in one kernel, against the same
    # computation written with XLA ops around grid's kernel (the GPU form).
    cfg = VSMLConfig(layer_sizes=(7, 10), hidden_size=4, msg_size=3, micro_ticks=2,
                     state_clip=0.6, reduce="sum")
    k = jax.random.split(jax.random.PRNGKey(3), 12)
    H, m, A, B, E = 4, 3, 7, 10, 2
    params = (jax.random.normal(k[0], (H, 4 * H)), jax.random.normal(k[1], (m, 4 * H)),
              jax.random.normal(k[2], (m, 4 * H)), jax.random.normal(k[3], (4 * H,)),
              jax.random.normal(k[4], (H, m)))
    per_episode = (jax.random.normal(k[5], (E, A, m)), jax.random.normal(k[6], (E, B, m)),
                   jax.random.normal(k[7], (E, A, B, H)), jax.random.normal(k[8], (E, A, B, H)))
    cts = (jax.random.normal(k[9], (E, A, B, H)), jax.random.normal(k[10], (E, A, B, H)),
           jax.random.normal(k[11], (E, B, m)))
    xla = functools.partial(pallas_grid._step_composed, cfg, (None, None), grid._lstm_ticks)
    ours = functools.partial(pallas_grid.fused_step, cfg, (None, None))

    def run(fn):
        def one(fwd, bwd, h, c, dh, dc, dmsg):
            out, vjp = jax.vjp(fn, *params, fwd, bwd, h, c)
            return out, vjp((dh, dc, dmsg))
        return jax.vmap(one)(*per_episode, *cts)
    (out, grads), (out_x, grads_x) = run(ours), run(xla)
    _close(out, out_x)
    _close(grads, grads_x, tol=5e-5)


@pytest.mark.parametrize("A,slots,reduce", [(20, ((1,), (2,)), "mean"),
                                             (32, (None, None), "sum")])
def test_fused_gpu_body_equals_the_xla_ops_under_vmap(A, slots, reduce):
    # The Triton body of the fused step (a program per output neuron b, a loop
    # over row chunks; A=20 pads and masks the last chunk), interpreted.
    H, m, B, E = 16, 4, 10, 2
    cfg = VSMLConfig(layer_sizes=(A, B), hidden_size=H, msg_size=m, micro_ticks=2,
                     state_clip=0.6, reduce=reduce)
    k = jax.random.split(jax.random.PRNGKey(A), 12)
    params = (0.3 * jax.random.normal(k[0], (H, 4 * H)), jax.random.normal(k[1], (m, 4 * H)),
              jax.random.normal(k[2], (m, 4 * H)), jax.random.normal(k[3], (4 * H,)),
              jax.random.normal(k[4], (H, m)))
    fwd, bwd = jax.random.normal(k[5], (E, A, m)), jax.random.normal(k[6], (E, B, m))
    if slots[0] is not None:  # the columns outside the slots are zero by contract
        fwd = fwd * jnp.isin(jnp.arange(m), jnp.array(slots[0]))
        bwd = bwd * jnp.isin(jnp.arange(m), jnp.array(slots[1]))
    per = (fwd, bwd, jax.random.normal(k[7], (E, A, B, H)),
           jax.random.normal(k[8], (E, A, B, H)))
    cts = (jax.random.normal(k[9], (E, A, B, H)), jax.random.normal(k[10], (E, A, B, H)),
           jax.random.normal(k[11], (E, B, m)))
    xla = functools.partial(pallas_grid._step_composed, cfg, slots, grid._lstm_ticks)
    assert pallas_grid._cols_supported(cfg, slots)
    ours = jax.vmap(lambda f, b, h, c: pallas_grid._cols_call(cfg, slots, *params, f, b, h, c,
                                                              interpret=True))(*per)
    _close(ours, jax.vmap(lambda f, b, h, c: xla(*params, f, b, h, c))(*per))
    grads = jax.vmap(lambda f, b, h, c, dh, dc, dm: pallas_grid._cols_call_bwd(
        cfg, slots, *params, f, b, h, c, dh, dc, dm, interpret=True))(*per, *cts)
    grads_x = jax.vmap(lambda f, b, h, c, dh, dc, dm: jax.vjp(xla, *params, f, b, h, c)[1](
        (dh, dc, dm)))(*per, *cts)
    if slots[0] is not None:
        # Only the slot columns of the messages' cotangents: the kernels never read
        # the others (grid's matmul form on CPU gives them values too).
        keep = [jnp.isin(jnp.arange(m), jnp.array(s)) for s in slots]
        grads = grads[:5] + (grads[5] * keep[0], grads[6] * keep[1]) + grads[7:]
        grads_x = grads_x[:5] + (grads_x[5] * keep[0], grads_x[6] * keep[1]) + grads_x[7:]
    _close(grads, grads_x, tol=5e-5)


def test_gpu_ticks_body_equals_the_xla_kernel():
    A = 20
    # The Triton body (rows of 16, a loop over b), interpreted; A=20 pads the rows.
    cfg = VSMLConfig(layer_sizes=(A, 10), hidden_size=16, msg_size=3, micro_ticks=2,
                     state_clip=0.6)
    w_h, pa, pb, h, c, dh, dc = _inputs(A, 10, 16, seed=1)
    _close(pallas_grid._rows_call(cfg, w_h, pa, pb, h, c, interpret=True),
           grid._ticks(cfg, w_h, pa, pb, h, c))
    _close(pallas_grid._rows_call_bwd(cfg, w_h, pa, pb, h, c, dh, dc, interpret=True),
           grid._lstm_ticks_bwd(cfg, (w_h, pa, pb, h, c), (dh, dc)), tol=5e-5)


def _episode(cfg, T, seed=0):
    key = jax.random.PRNGKey(seed)
    x = jax.random.normal(key, (T, cfg.input_size))
    y = jax.nn.one_hot(jax.random.randint(key, (T,), 0, cfg.num_classes), cfg.num_classes)
    return x, y


def test_unroll_and_meta_gradient_equal_fast_and_reference():
    params = init_params(jax.random.PRNGKey(0), CFG)
    state = init_state(jax.random.PRNGKey(1), CFG)
    data = _episode(CFG, 6)
    outs = {impl: jax.jit(lambda p, s, d, impl=impl: unroll(p, s, d, impl=impl))(
        params, state, data) for impl in ("pallas", "fast", "reference")}
    _close(outs["pallas"], outs["fast"])
    _close(outs["pallas"], outs["reference"], tol=1e-4)

    # BPTT through the unroll with remat, for a batch of 2 episodes (vmap).
    states = jax.tree_util.tree_map(lambda a: jnp.stack([a, 0.5 * a]), state)
    batch = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), data, _episode(CFG, 6, 1))

    def grad(impl):
        def loss(p):
            per = jax.vmap(lambda s, d: meta_loss(p, s, d, impl=impl, remat=True))
            return jnp.mean(per(states, batch))
        return jax.jit(jax.grad(loss))(params)
    g_pallas, g_fast, g_ref = grad("pallas"), grad("fast"), grad("reference")
    assert float(jnp.max(jnp.abs(jax.flatten_util.ravel_pytree(g_pallas)[0]))) > 1e-3
    _close(g_pallas, g_fast, tol=1e-4)
    _close(g_pallas, g_ref, tol=1e-4)


def test_bfloat16_states_compute_in_float32():
    # 16-bit states: the kernels load them as float32 (Mosaic and Triton want
    # 32-bit accumulators) and store bfloat16. The meta-gradient stays as close
    # to the float32 one as bfloat16 rounding allows, like the XLA kernels'.
    base = dict(layer_sizes=(7, 10), hidden_size=4, msg_size=3, micro_ticks=2,
                state_clip=0.6)
    cfg16, cfg32 = VSMLConfig(dtype="bfloat16", **base), VSMLConfig(**base)
    p16 = init_params(jax.random.PRNGKey(0), cfg16)
    s16 = init_state(jax.random.PRNGKey(1), cfg16)
    f32 = lambda t: jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), t)
    p32, s32 = p16.replace(cells=f32(p16.cells), cfg=cfg32), f32(s16)
    data = _episode(cfg32, 6)

    def grad(p, s, impl):
        g = jax.grad(lambda p: meta_loss(p, s, data, impl=impl, remat=True))(p)
        return jax.flatten_util.ravel_pytree(g)[0].astype(jnp.float32)
    ref = grad(p32, s32, "fast")
    err = {impl: float(jnp.max(jnp.abs(grad(p16, s16, impl) - ref)))
           for impl in ("fast", "pallas")}
    scale = float(jnp.max(jnp.abs(ref)))
    assert err["pallas"] < 0.05 * scale and err["fast"] < 0.05 * scale, (err, scale)


def test_vanilla_cells_use_the_xla_kernel():
    cfg = VSMLConfig(layer_sizes=(5, 3), hidden_size=4, msg_size=2, cell="vanilla")
    params = init_params(jax.random.PRNGKey(0), cfg)
    state = init_state(jax.random.PRNGKey(1), cfg)
    data = _episode(cfg, 4)
    _close(unroll(params, state, data, impl="pallas"), unroll(params, state, data))


SCRIPT = r"""
import json, sys
from vsml_jax import accelerators, hlo_stats
devices = accelerators.abstract_devices(accelerators.get(sys.argv[1]))
import jax, jax.numpy as jnp
from jax.sharding import SingleDeviceSharding
from vsml_jax.config import VSMLConfig
from vsml_jax.network import meta_loss
from vsml_jax.params import init_params
from vsml_jax.state import init_state
cfg = VSMLConfig(layer_sizes=(48, 10), hidden_size=16, msg_size=4, micro_ticks=2)
sh = SingleDeviceSharding(devices[0])
params = jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), cfg))
state = jax.eval_shape(lambda: init_state(jax.random.PRNGKey(0), cfg))
data = (jax.ShapeDtypeStruct((40, 48), jnp.float32),
        jax.ShapeDtypeStruct((40, 10), jnp.float32))
put = lambda tree, lead: jax.tree_util.tree_map(
    lambda a: jax.ShapeDtypeStruct(lead + a.shape, a.dtype, sharding=sh), tree)
def loss(p, s, d):
    return jnp.mean(jax.vmap(lambda s, d: meta_loss(p, s, d, impl="pallas", remat=True))(s, d))
text = jax.jit(jax.grad(loss)).lower(put(params, ()), put(state, (2,)),
                                     put(data, (2,))).compile().as_text()
loops = hlo_stats.while_loops(text)
print("JSON:" + json.dumps([[l for l in hlo_stats.computations(text)[loop.body]
                             if "custom-call" in l] for loop in loops]))
"""


def _compile_for(target: str):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, target], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("JSON:")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][5:])


def _bodies_calling(bodies, name):
    """How many loop bodies have a custom call named `name` (the Pallas call's name)."""
    return sum(1 for body in bodies if any(f"%{name}." in line for line in body))


def test_compiles_for_tpu_with_the_kernels_in_the_time_loops():
    import importlib.util
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail("libtpu is not installed: pip install -e '.[tpu-aot]' (CI installs it).")
    bodies = _compile_for("tpu-v5e-1")
    # The forward steps and the backward steps (which re-run the step's forward
    # under remat) each call the fused Mosaic kernel; the reverse is one more.
    assert _bodies_calling(bodies, "vsml_layer_step") >= 2, bodies
    assert _bodies_calling(bodies, "vsml_layer_step_bwd") >= 1, bodies


def test_compiles_for_gpu_with_the_kernels_in_the_time_loops():
    if not accelerators.cuda_plugin_installed():
        pytest.skip("the CUDA plugin is not installed (pip install -e '.[gpu-aot]'); "
                    "GPU compiles are checked only where it is.")
    bodies = _compile_for("gpu-h200")
    # Triton calls named after the fused step in the forward and backward loops.
    triton = [[l for l in body if "xla.gpu.triton" in l] for body in bodies]
    assert sum(1 for calls in triton if any("vsml_layer_step/" in l or
                                            'vsml_layer_step"' in l for l in calls)) >= 2, triton
    assert any("vsml_layer_step_bwd" in l for calls in triton for l in calls), triton


def test_kernel_count_includes_ops_with_tuple_results():
    # The Pallas calls (and multi-output fusions) return tuples; the per-body
    # kernel count must see them.
    text = "\n".join([
        "%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {",
        "  %p = (s32[], f32[4]{0}) parameter(0)",
        "  %k = (f32[160,784]{1,0:T(8,128)S(1)}, f32[10,8]{1,0}) custom-call(%a), "
        "custom_call_target=\"tpu_custom_call\"",
        "  %f = (f32[4]{0}, f32[]) fusion(%a), kind=kLoop, calls=%fused",
        "  %g = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused2",
        "  ROOT %t = (s32[], f32[4]{0}) tuple(%i, %g)",
        "}",
        "%cond (p: (s32[], f32[4])) -> pred[] {",
        "  %c = s32[] constant(5)",
        "  ROOT %lt = pred[] compare(%i, %c), direction=LT",
        "}",
        "ENTRY %main () -> f32[4] {",
        "  %w = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body",
        "}",
    ])
    [loop] = hlo_stats.while_loops(text)
    assert loop.kernels == 3, loop
