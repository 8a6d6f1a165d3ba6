"""The tiled CPU path of the fast kernel against the whole-grid path and the reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vsml_jax
from vsml_jax import grid, reference
from vsml_jax.state import LayerState

TOL = dict(rtol=1e-5, atol=1e-5)


def _layer_inputs(cfg, A, B, seed=0):
    """Random V_M, a random layer state [A, B, H] and random messages."""
    k = jax.random.split(jax.random.key(seed), 5)
    params = vsml_jax.init_params(k[0], cfg)
    H = cfg.hidden_size
    h = jax.random.normal(k[1], (A, B, H))
    c = jax.random.normal(k[2], (A, B, H if cfg.cell == "lstm" else 0))
    fwd = jax.random.normal(k[3], (A, cfg.msg_size))
    bwd = jax.random.normal(k[4], (B, cfg.msg_size))
    return params.layer(0), LayerState(h=h, c=c), fwd, bwd


@pytest.mark.parametrize("cell,tiles", [("lstm", 3), ("vanilla", 2)])
def test_tiled_ticks_equal_whole_grid_and_reference(cell, tiles):
    A, B = 6, 5
    cfg = vsml_jax.VSMLConfig(layer_sizes=(A, B), hidden_size=4, msg_size=3,
                              micro_ticks=2, cell=cell, coordinates=True)
    p, s, fwd, bwd = _layer_inputs(cfg, A, B)
    tiled = jax.jit(functools.partial(grid.layer_ticks, tiles=tiles), static_argnums=(1, 5))
    whole = jax.jit(functools.partial(grid.layer_ticks, tiles=1), static_argnums=(1, 5))
    ref = jax.jit(reference.layer_ticks, static_argnums=(1, 5))
    out_t = tiled(p, cfg, s, fwd, bwd, 0)
    out_w = whole(p, cfg, s, fwd, bwd, 0)
    out_r = ref(p, cfg, s, fwd, bwd, 0)
    assert not np.allclose(out_t.h, s.h)  # the ticks did something
    for a, b in [(out_t, out_w), (out_t, out_r)]:
        np.testing.assert_allclose(a.h, b.h, **TOL)
        np.testing.assert_allclose(a.c, b.c, **TOL)


def test_num_tiles_divides_and_targets_tile_size():
    assert grid.num_tiles(7, 3) == 1  # small grids run whole
    n = grid.num_tiles(784, 10)
    assert 784 % n == 0 and n > 1
    assert 0.5 * grid.TILE_CELLS <= 784 // n * 10 <= 2 * grid.TILE_CELLS
    assert grid.num_tiles(997, 10) in (1, 997) or 997 % grid.num_tiles(997, 10) == 0


def test_bad_tile_count_raises():
    cfg = vsml_jax.VSMLConfig(layer_sizes=(6, 5), hidden_size=4, msg_size=3)
    p, s, fwd, bwd = _layer_inputs(cfg, 6, 5)
    with pytest.raises(ValueError, match="divisor"):
        grid.layer_ticks(p, cfg, s, fwd, bwd, 0, tiles=4)


def test_unroll_on_a_tiled_grid_matches_reference_including_grad(monkeypatch):
    """A grid big enough to be tiled by default: outputs and BPTT gradients agree."""
    monkeypatch.setattr(grid, "TILE_CELLS", 8)  # 12 x 4 grid -> 6 tiles of 8 cells
    cfg = vsml_jax.VSMLConfig(layer_sizes=(12, 4), hidden_size=4, msg_size=3)
    assert grid.num_tiles(12, 4) > 1
    params = vsml_jax.init_params(jax.random.key(0), cfg)
    state = vsml_jax.init_state(jax.random.key(1), cfg)
    rng = np.random.default_rng(0)
    T = 5
    x = jnp.asarray(rng.normal(size=(T, 12)), jnp.float32)
    y = jnp.asarray(np.eye(4, dtype=np.float32)[rng.integers(0, 4, T)])

    def loss(p, impl):
        return vsml_jax.meta_loss(p, state, (x, y), impl=impl)

    lf, gf = jax.jit(jax.value_and_grad(functools.partial(loss, impl="fast")))(params)
    lr, gr = jax.jit(jax.value_and_grad(functools.partial(loss, impl="reference")))(params)
    np.testing.assert_allclose(lf, lr, **TOL)
    for a, b in zip(jax.tree_util.tree_leaves(gf), jax.tree_util.tree_leaves(gr)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(gf)) > 1e-4


def test_custom_vjp_of_lstm_ticks_equals_autodiff(state_clip=0.3):
    """The hand-written backward pass of the LSTM ticks against jax.grad of the same forward."""
    A, B = 5, 3
    cfg = vsml_jax.VSMLConfig(layer_sizes=(A, B), hidden_size=4, msg_size=3, micro_ticks=3,
                              state_clip=state_clip)
    p, s, fwd, bwd = _layer_inputs(cfg, A, B, seed=3)
    w_h, pre_a, pre_b = grid.scaled_preactivations(p, cfg, fwd, bwd, 0)
    k = jax.random.split(jax.random.key(9), 2)
    wh_, wc_ = jax.random.normal(k[0], s.h.shape), jax.random.normal(k[1], s.c.shape)

    def objective(ticks, *args):
        h, c = ticks(cfg, *args)
        return jnp.sum(wh_ * h) + jnp.sum(wc_ * c ** 2)

    args = (w_h, pre_a, pre_b, s.h, s.c)
    got = jax.jit(jax.grad(functools.partial(objective, grid._lstm_ticks),
                           argnums=(0, 1, 2, 3, 4)))(*args)
    want = jax.jit(jax.grad(functools.partial(objective, grid._ticks),
                            argnums=(0, 1, 2, 3, 4)))(*args)
    if True:  # the clip is active for some cells, so its gradient mask is exercised
        c_out = grid._ticks(cfg, *args)[1]
        assert np.mean(np.abs(np.asarray(c_out)) >= state_clip) > 0.1
    for a, b in zip(got, want):
        assert float(jnp.max(jnp.abs(b))) > 1e-3
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
