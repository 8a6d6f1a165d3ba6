"""The core API: config, params, state, the fast and reference kernels, unroll."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vsml_jax
from vsml_jax import grid
from vsml_jax.state import LayerState

TOL = dict(rtol=1e-5, atol=1e-5)

unroll_jit = jax.jit(vsml_jax.unroll, static_argnames=("impl", "remat", "remat_chunk"))


def make_data(seed, cfg, T, K=None):
    """Random inputs [T, (K,) A0] and one-hot labels [T, (K,) C] (numpy draws)."""
    rng = np.random.default_rng(seed)
    lead = (T,) if K is None else (T, K)
    x = rng.normal(size=lead + (cfg.input_size,)).astype(np.float32)
    y = np.eye(cfg.num_classes, dtype=np.float32)[rng.integers(0, cfg.num_classes, lead)]
    return jnp.asarray(x), jnp.asarray(y)


def random_params(cfg, seed):
    """V_M with the structure of init_params(cfg), filled from numpy.

    The kernels are compared for any V_M; numpy draws avoid compiling a random
    kernel for every shape (the real init is exercised by the tests below that
    call init_params).
    """
    shapes = jax.eval_shape(lambda: vsml_jax.init_params(jax.random.key(0), cfg))
    rng = np.random.default_rng(seed)
    scale = lambda s: 1.0 / np.sqrt(s.shape[-2]) if len(s.shape) >= 2 else 0.5
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(scale(s) * rng.normal(size=s.shape), s.dtype), shapes)


def random_state(cfg, seed, K=None):
    """V_L with the structure of init_state(cfg), every leaf (h, c, error, label) random."""
    shapes = jax.eval_shape(lambda: vsml_jax.init_state(jax.random.key(0), cfg))
    rng = np.random.default_rng(seed)
    state = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), shapes)
    return state if K is None else vsml_jax.init_state_for_streams(state, K)


def setup(cfg, seed=0, T=8, K=None):
    return (random_params(cfg, seed), random_state(cfg, seed + 1, K),
            make_data(seed + 2, cfg, T, K))


def assert_trees_close(a, b, **tol):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.shape == y.shape
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   **(tol or TOL))


# --------------------------------------- fast path == reference path == numpy
BASE = dict(layer_sizes=(7, 3), hidden_size=4, msg_size=3, micro_ticks=2)
TWO = dict(BASE, layer_sizes=(7, 5, 3))
# Few cases, each combining several options, so that every option is covered
# with a handful of compilations.
CASES = {
    "vanilla_1layer_mean_1tick_noclip": (
        dict(BASE, cell="vanilla", micro_ticks=1, state_clip=None), None),
    "lstm_1layer_sum_3ticks_ptl_label_streams": (
        dict(BASE, reduce="sum", micro_ticks=3, protocol="predict_then_learn",
             feed_label=True, label_slot=2), 2),
    "lstm_2layer_tied_bwd_coords_label": (
        dict(TWO, coordinates=True, feed_label=True, label_slot=1), None),
    "lstm_2layer_untied_nobwd_sum_ptl_clip": (
        dict(TWO, tie_layers=False, backward_interaction=False, reduce="sum",
             protocol="predict_then_learn", state_clip=0.5), None),
    "vanilla_2layer_untied_bwd_coords_tanh_readout": (
        dict(TWO, cell="vanilla", tie_layers=False, coordinates=True,
             readout_tanh=True, readout_scale=3.0, error_scale=2.0), None),
}


@jax.jit
def fast_and_reference(params, state, data):
    return (vsml_jax.unroll(params, state, data, impl="fast"),
            vsml_jax.unroll(params, state, data, impl="reference"))


@pytest.mark.parametrize("name", list(CASES))
def test_fast_equals_reference_equals_numpy(name):
    kwargs, K = CASES[name]
    cfg = vsml_jax.VSMLConfig(**kwargs)
    params, state, data = setup(cfg, T=6, K=K)
    (s_fast, o_fast), (s_ref, o_ref) = fast_and_reference(params, state, data)
    lead = (6,) if K is None else (6, K)
    assert o_fast.logits.shape == lead + (3,) and o_fast.loss.shape == lead
    # Guard against a vacuous comparison: the episode does something.
    assert np.std(np.asarray(o_fast.logits)) > 1e-3
    assert not np.allclose(s_fast.layers[0].h, state.layers[0].h)
    assert_trees_close(o_fast, o_ref)
    assert_trees_close(s_fast, s_ref)
    # Both against the per-cell LSTM (eq. 6) / RNN (eq. 3) in numpy.
    layers, logits, losses = _np_unroll(params, state, data)
    np.testing.assert_allclose(o_fast.logits, logits, **TOL)
    np.testing.assert_allclose(o_fast.loss, losses, **TOL)
    np.testing.assert_allclose(o_fast.correct, (np.argmax(logits, -1) == np.argmax(
        np.asarray(data[1]), -1)).astype(np.float32))
    for s, (h, c) in zip(s_fast.layers, layers):
        np.testing.assert_allclose(s.h, h, **TOL)
        np.testing.assert_allclose(s.c, c, **TOL)
    if K is not None:
        # The K copies of V_L stay identical (states are averaged every step),
        # while each stream sees its own data.
        for layer in s_fast.layers:
            np.testing.assert_allclose(layer.h, jnp.broadcast_to(layer.h[:1], layer.h.shape))
        assert not np.allclose(o_fast.logits[:, 0], o_fast.logits[:, 1])


# --------------------------------------------- eq. 6 written out by hand in numpy
def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_params(params, layer):
    cfg = params.cfg
    leaves = {k: getattr(params.cells, k) for k in
              ("w_h", "w_f", "w_b", "bias", "c_fwd", "u_bwd", "w_coord")}
    out = {}
    for k, v in leaves.items():
        if v is not None and not cfg.tie_layers:
            v = v[layer]
        out[k] = None if v is None else np.asarray(v, np.float64)
    return out


def _np_layer_ticks(p, cfg, h, c, fwd, bwd, layer):
    """Every cell (a, b) of the grid, one at a time: the LSTM of eq. 6 / the RNN of eq. 3."""
    A, B, _ = h.shape
    L = cfg.num_layers
    clip = (lambda v: v) if cfg.state_clip is None else (
        lambda v: np.clip(v, -cfg.state_clip, cfg.state_clip))
    for _ in range(cfg.micro_ticks):
        h_new, c_new = np.zeros_like(h), np.zeros_like(c)
        for a in range(A):
            for b in range(B):
                pre = h[a, b] @ p["w_h"] + fwd[a] @ p["w_f"] + bwd[b] @ p["w_b"] + p["bias"]
                if p["w_coord"] is not None:
                    pre = pre + (a / max(A - 1, 1)) * p["w_coord"][0] \
                        + (b / max(B - 1, 1)) * p["w_coord"][1] \
                        + (layer / max(L - 1, 1)) * p["w_coord"][2]
                if cfg.cell == "lstm":
                    i, f, g, o = np.split(pre, 4)
                    c_new[a, b] = clip(_sigmoid(f) * c[a, b] + _sigmoid(i) * np.tanh(g))
                    h_new[a, b] = _sigmoid(o) * np.tanh(c_new[a, b])
                else:
                    h_new[a, b] = clip(np.tanh(pre))
        h, c = h_new, (c_new if cfg.cell == "lstm" else c)
    return h, c


def _np_reduce(x, axis, how):
    return x.mean(axis) if how == "mean" else x.sum(axis)


def _np_forward_pass(params, layers, x, err_msg):
    cfg = params.cfg
    L = cfg.num_layers
    bwd_ins = []
    for l in range(L - 1):
        p, (h, _) = _np_params(params, l + 1), layers[l + 1]
        if p["u_bwd"] is None:
            bwd_ins.append(np.zeros((h.shape[0], cfg.msg_size)))
        else:  # each cell projects its own h, then the reduction over b
            bwd_ins.append(_np_reduce(np.einsum("abh,hm->abm", h, p["u_bwd"]), 1,
                                      cfg.reduce))
    bwd_ins.append(err_msg)
    fwd = np.zeros((x.shape[0], cfg.msg_size))
    fwd[:, cfg.input_slot] = x
    new = []
    for l in range(L):
        p = _np_params(params, l)
        h, c = _np_layer_ticks(p, cfg, *layers[l], fwd, bwd_ins[l], l)
        fwd = _np_reduce(np.einsum("abh,hm->abm", h, p["c_fwd"]), 0, cfg.reduce)
        new.append((h, c))
    value = fwd[:, cfg.output_slot]
    if cfg.readout_tanh:
        value = np.tanh(value)
    return new, cfg.readout_scale * value


def _np_step(params, layers, error, label, x, y):
    """One online step of sec. 3.2 (both protocols) in numpy."""
    cfg = params.cfg

    def err_msg(e, lab):
        msg = np.zeros((cfg.num_classes, cfg.msg_size))
        msg[:, cfg.error_slot] = e
        if cfg.feed_label:
            msg[:, cfg.label_slot] = lab
        return msg

    if cfg.protocol == "delayed_error":
        layers, logits = _np_forward_pass(params, layers, x, err_msg(error, label))
    else:  # predict with no feedback, then tick again on the error
        zeros = np.zeros(cfg.num_classes)
        layers, logits = _np_forward_pass(params, layers, x, err_msg(zeros, zeros))
    prob = np.exp(logits - logits.max())
    prob /= prob.sum()
    loss = -np.sum(y * np.log(prob))
    error = cfg.error_scale * (prob - y)
    if cfg.protocol == "predict_then_learn":
        layers, _ = _np_forward_pass(params, layers, x, err_msg(error, y))
    return layers, error, y, logits, loss


def _np_unroll(params, state, data):
    """The online episode in plain numpy (float64): one stream, or K streams whose
    cell states are averaged after every step. Returns (layers, logits, losses)."""
    as64 = lambda a: np.asarray(a, np.float64)
    inputs, labels = as64(data[0]), as64(data[1])
    streams = inputs.ndim == 3
    if not streams:  # one stream = K = 1 without averaging
        inputs, labels = inputs[:, None], labels[:, None]
        state = jax.tree_util.tree_map(lambda a: a[None], state)
    K = inputs.shape[1]
    layers = [[(as64(s.h)[k], as64(s.c)[k]) for s in state.layers] for k in range(K)]
    error = [as64(state.error)[k] for k in range(K)]
    label = [as64(state.label)[k] for k in range(K)]
    all_logits, all_losses = [], []
    for x_t, y_t in zip(inputs, labels):
        logits_t, losses_t = [], []
        for k in range(K):
            layers[k], error[k], label[k], logits, loss = _np_step(
                params, layers[k], error[k], label[k], x_t[k], y_t[k])
            logits_t.append(logits)
            losses_t.append(loss)
        if streams:
            mean = [(np.mean([layers[k][l][0] for k in range(K)], 0),
                     np.mean([layers[k][l][1] for k in range(K)], 0))
                    for l in range(len(layers[0]))]
            layers = [list(mean) for _ in range(K)]
        all_logits.append(logits_t)
        all_losses.append(losses_t)
    logits, losses = np.array(all_logits), np.array(all_losses)
    if not streams:
        return layers[0], logits[:, 0], losses[:, 0]
    stacked = [(np.stack([layers[k][l][0] for k in range(K)]),
                np.stack([layers[k][l][1] for k in range(K)])) for l in range(len(layers[0]))]
    return stacked, logits, losses


def test_fast_kernel_one_tick_matches_eq6_by_hand():
    """One call of grid.layer_ticks on a 2x2 grid against the per-cell LSTM in numpy."""
    cfg = vsml_jax.VSMLConfig(layer_sizes=(2, 2), hidden_size=3, msg_size=2,
                              micro_ticks=1, coordinates=True, state_clip=None)
    params = random_params(cfg, 3)
    rng = np.random.default_rng(0)
    h, c = (rng.normal(size=(2, 2, 3)) for _ in range(2))
    fwd, bwd = rng.normal(size=(2, 2)), rng.normal(size=(2, 2))

    @jax.jit
    def tick_and_message(p, h, c, fwd, bwd):
        out = grid.layer_ticks(p, cfg, LayerState(h=h, c=c), fwd, bwd, 0)
        return out, grid.forward_messages(p, cfg, out)

    f32 = lambda v: jnp.asarray(v, jnp.float32)
    out, msg = tick_and_message(params.cells, f32(h), f32(c), f32(fwd), f32(bwd))
    p = _np_params(params, 0)
    # Eq. 6 for every cell (a, b), written out.
    for a in range(2):
        for b in range(2):
            pre = (h[a, b] @ p["w_h"] + fwd[a] @ p["w_f"] + bwd[b] @ p["w_b"] + p["bias"]
                   + a * p["w_coord"][0] + b * p["w_coord"][1])  # layer position 0
            i, f, g, o = np.split(pre, 4)
            c_new = _sigmoid(f) * c[a, b] + _sigmoid(i) * np.tanh(g)
            np.testing.assert_allclose(out.c[a, b], c_new, **TOL)
            np.testing.assert_allclose(out.h[a, b], _sigmoid(o) * np.tanh(c_new), **TOL)
    # The message leaving the layer: mean over a of h_ab @ C.
    np.testing.assert_allclose(msg, np.mean(np.asarray(out.h, np.float64) @ p["c_fwd"], 0),
                               **TOL)


# ----------------------------------------------------- jit / vmap / grad / remat
SMALL = vsml_jax.VSMLConfig(layer_sizes=(6, 4, 3), hidden_size=4, msg_size=3,
                            micro_ticks=2)


def test_jit_equals_eager():
    params, state, data = setup(SMALL)
    eager = vsml_jax.unroll(params, state, data)
    assert_trees_close(unroll_jit(params, state, data), eager, rtol=1e-6, atol=1e-6)


def test_vmap_over_episodes_equals_loop():
    params = random_params(SMALL, 0)
    n = 3
    states = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs),
                                    *(random_state(SMALL, 10 + i) for i in range(n)))
    xs, ys = zip(*(make_data(20 + i, SMALL, 8) for i in range(n)))
    data = (jnp.stack(xs), jnp.stack(ys))
    batched = jax.jit(jax.vmap(vsml_jax.unroll, in_axes=(None, 0, 0)))(params, states, data)
    for i in range(n):
        state_i = jax.tree_util.tree_map(lambda a: a[i], states)
        single = unroll_jit(params, state_i, (xs[i], ys[i]))
        assert_trees_close(jax.tree_util.tree_map(lambda a: a[i], batched), single)
    assert not np.allclose(batched[1].logits[0], batched[1].logits[1])


def test_vmap_over_population_of_params_equals_loop():
    members = [random_params(SMALL, 30 + i) for i in range(3)]
    population = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *members)
    assert population.cfg == SMALL
    state, data = random_state(SMALL, 1), make_data(2, SMALL, 8)
    losses = jax.jit(jax.vmap(vsml_jax.meta_loss, in_axes=(0, None, None)))(
        population, state, data)
    loop = [np.mean(unroll_jit(p, state, data)[1].loss) for p in members]
    np.testing.assert_allclose(losses, loop, **TOL)
    assert len(set(np.asarray(losses).round(5))) == 3


GRAD = vsml_jax.VSMLConfig(layer_sizes=(5, 4, 3), hidden_size=3, msg_size=2,
                           micro_ticks=1, feed_label=True, label_slot=1)


@functools.partial(jax.jit, static_argnames=("remat", "remat_chunk"))
def loss_grad_and_outputs(params, state, data, remat=False, remat_chunk=None):
    """((meta-loss, outputs), d meta-loss / d params) for one episode."""
    def loss(p):
        _, out = vsml_jax.unroll(p, state, data, remat=remat, remat_chunk=remat_chunk)
        return jnp.mean(out.loss), out
    return jax.value_and_grad(loss, has_aux=True)(params)


def test_grad_matches_finite_differences_in_float64():
    """BPTT through the episode against a central difference, both in float64."""
    with jax.enable_x64(True):
        cfg = GRAD.replace(dtype="float64", state_clip=None)
        params, state, data = setup(cfg, T=6)
        (_, _), grads = loss_grad_and_outputs(params, state, data)
        leaves = jax.tree_util.tree_leaves(grads)
        assert all(g.dtype == jnp.float64 and np.all(np.isfinite(g)) for g in leaves)
        assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)
        loss_at = lambda p: float(loss_grad_and_outputs(p, state, data)[0][0])
        rng = np.random.default_rng(0)
        eps = 1e-5
        for _ in range(2):
            direction = jax.tree_util.tree_map(
                lambda g: jnp.asarray(rng.normal(size=g.shape)), grads)
            along = lambda e: jax.tree_util.tree_map(lambda p, v: p + e * v,
                                                     params, direction)
            fd = (loss_at(along(eps)) - loss_at(along(-eps))) / (2 * eps)
            analytic = sum(float(jnp.vdot(g, v)) for g, v in zip(
                leaves, jax.tree_util.tree_leaves(direction)))
            assert abs(analytic) > 1e-4
            np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-9)


def test_remat_gives_same_loss_outputs_and_grads():
    # float64 like the test above, so the plain run is already compiled.
    with jax.enable_x64(True):
        params, state, data = setup(GRAD.replace(dtype="float64", state_clip=None), T=6)
        plain = loss_grad_and_outputs(params, state, data)
        assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(plain[1]))
        for kwargs in (dict(remat=True), dict(remat_chunk=3), dict(remat_chunk=(3, 2))):
            assert_trees_close(loss_grad_and_outputs(params, state, data, **kwargs), plain,
                               rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------- determinism
init_params_jit = jax.jit(vsml_jax.init_params, static_argnums=1)
init_state_jit = jax.jit(vsml_jax.init_state, static_argnums=1)


def test_same_keys_same_outputs():
    cfg = SMALL
    data = make_data(0, cfg, 8)

    def run(seed):
        params = init_params_jit(jax.random.key(seed), cfg)
        state = init_state_jit(jax.random.key(seed + 1), cfg)
        return params, state, unroll_jit(params, state, data)

    first, again, other = run(7), run(7), run(8)
    for x, y in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(x, y)
    # A different key gives different V_M, V_L and outputs.
    assert not np.allclose(first[0].cells.w_h, other[0].cells.w_h)
    assert not np.allclose(first[1].layers[0].c, other[1].layers[0].c)
    assert not np.allclose(first[2][1].logits, other[2][1].logits)


# -------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs,match", [
    (dict(cell="gru"), "cell='gru' is unknown"),
    (dict(msg_size=1, feed_label=True), "label_slot=1 does not fit"),
    (dict(msg_size=4, input_slot=4), "input_slot=4 does not fit"),
    (dict(msg_size=4, output_slot=-1), "output_slot=-1 does not fit"),
    (dict(msg_size=4, error_slot=9), "error_slot=9 does not fit"),
    (dict(feed_label=True, label_slot=0, error_slot=0), "separate slots"),
    (dict(reduce="max"), "reduce='max' is unknown"),
    (dict(protocol="online"), "protocol='online' is unknown"),
    (dict(layer_sizes=(5,)), "at least an input and an output"),
    (dict(hidden_size=0), "hidden_size=0"),
    (dict(dtype="int8"), "dtype='int8' is unknown"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vsml_jax.VSMLConfig(**kwargs)


def test_bad_unroll_inputs_raise():
    params, state, (x, y) = setup(SMALL, T=8)
    with pytest.raises(ValueError, match="width 5 but the config's first layer has 6"):
        vsml_jax.unroll(params, state, (x[:, :5], y))
    with pytest.raises(ValueError, match="expected"):
        vsml_jax.unroll(params, state, (x[0], y))
    with pytest.raises(ValueError, match="labels have shape"):
        vsml_jax.unroll(params, state, (x, y[:, :2]))
    with pytest.raises(ValueError, match="labels have shape"):
        vsml_jax.unroll(params, state, (x, y[:4]))
    with pytest.raises(ValueError, match="remat_chunk=3 must divide"):
        vsml_jax.unroll(params, state, (x, y), remat_chunk=3)
    with pytest.raises(ValueError, match=r"product of remat_chunk=\(2, 3\) \(6\) must divide"):
        vsml_jax.unroll(params, state, (x, y), remat_chunk=(2, 3))
    with pytest.raises(ValueError, match="impl='fastest' is unknown"):
        vsml_jax.unroll(params, state, (x, y), impl="fastest")
    # Streams mode without broadcasting the state to the K streams.
    with pytest.raises(ValueError, match="init_state_for_streams"):
        vsml_jax.unroll(params, state, (x[:, None], y[:, None]))


@pytest.mark.parametrize("other", [
    dict(layer_sizes=(5, 4, 3)),
    dict(layer_sizes=(6, 3)),
    dict(hidden_size=5),
    dict(layer_sizes=(6, 4, 2)),
    dict(layer_sizes=(6, 5, 3)),
    dict(cell="vanilla"),
    dict(dtype="bfloat16"),
], ids=["first_layer", "num_layers", "hidden", "classes", "hidden_layer", "cell", "dtype"])
def test_state_from_another_config_raises(other):
    params, _, data = setup(SMALL)
    foreign_cfg = SMALL.replace(**other)
    foreign = random_state(foreign_cfg, 0)
    if foreign_cfg.num_classes != SMALL.num_classes:  # labels that fit the params
        data = make_data(0, SMALL, 8)
    with pytest.raises(ValueError, match="state does not match the config"):
        vsml_jax.unroll(params, foreign, data)


# ------------------------------------------------------------------------ counts
def test_counts_for_the_paper_config():
    cfg = vsml_jax.VSMLConfig(layer_sizes=(784, 10), hidden_size=16, msg_size=8)
    H, m = 16, 8
    assert vsml_jax.count_learned_variables(cfg) == 784 * 10 * 16 * 2 == 250880
    # w_h [H, 4H], w_f and w_b [m, 4H], bias [4H], c_fwd and u_bwd [H, m].
    per_set = H * 4 * H + 2 * m * 4 * H + 4 * H + 2 * H * m
    assert vsml_jax.count_meta_variables(cfg) == per_set == 2368
    # Untied layers have one set each; coordinates add a [3, 4H] projection.
    deep = cfg.replace(layer_sizes=(784, 32, 10), tie_layers=False, coordinates=True)
    assert vsml_jax.count_meta_variables(deep) == 2 * (per_set + 3 * 4 * H)
    assert vsml_jax.count_learned_variables(deep) == (784 * 32 + 32 * 10) * 2 * H
    vanilla = cfg.replace(cell="vanilla", backward_interaction=False)
    assert vsml_jax.count_meta_variables(vanilla) == H * H + 2 * m * H + H + H * m
    assert vsml_jax.count_learned_variables(vanilla) == 784 * 10 * H


# ------------------------------------------------------------------------- dtype
def test_bfloat16_runs():
    cfg = vsml_jax.VSMLConfig(layer_sizes=(6, 3), hidden_size=4, msg_size=3,
                              dtype="bfloat16")
    params = init_params_jit(jax.random.key(0), cfg)
    state = init_state_jit(jax.random.key(1), cfg)
    # Every float is bfloat16; the step count stays an int32.
    assert state.step.dtype == jnp.int32
    assert all(x.dtype == jnp.bfloat16
               for x in jax.tree_util.tree_leaves((params, state.replace(step=None))))
    final, out = unroll_jit(params, state, make_data(2, cfg, 6))
    assert out.logits.dtype == jnp.bfloat16
    assert final.layers[0].c.dtype == jnp.bfloat16
    for leaf in jax.tree_util.tree_leaves((final, out)):
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
    assert not np.allclose(np.asarray(final.layers[0].c, np.float32),
                           np.asarray(state.layers[0].c, np.float32))


@pytest.mark.parametrize("coordinates", [False, True])
def test_unroll_is_equivariant_to_input_permutations_without_coordinates(coordinates):
    """All cells share V_M, so permuting the inputs together with the rows of
    cells that read them permutes nothing that matters: same predictions, and
    the state is the permuted state. With coordinates a cell knows its row, and
    the symmetry is (deliberately) broken."""
    cfg = vsml_jax.VSMLConfig(layer_sizes=(6, 4), hidden_size=4, msg_size=2,
                              micro_ticks=2, coordinates=coordinates)
    params = vsml_jax.init_params(jax.random.key(0), cfg)
    state = vsml_jax.init_state(jax.random.key(1), cfg)
    x = jax.random.normal(jax.random.key(2), (7, 6))
    y = jax.nn.one_hot(jnp.arange(7) % 4, 4)
    perm = np.array([3, 0, 5, 1, 4, 2])
    permute_rows = lambda s: s.replace(layers=tuple(
        LayerState(h=l.h[perm], c=l.c[perm]) for l in s.layers))
    final, out = vsml_jax.unroll(params, state, (x, y))
    final_p, out_p = vsml_jax.unroll(params, permute_rows(state), (x[:, perm], y))
    if coordinates:
        assert not np.allclose(out.logits, out_p.logits, atol=1e-4)
        return
    np.testing.assert_allclose(out_p.logits, out.logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(final_p.layers[0].c, final.layers[0].c[perm], rtol=1e-5,
                               atol=1e-6)
