"""The per-class (unrolled) softmax, loss and argmax of a step equal the library ones."""
import jax
import jax.numpy as jnp
import numpy as np

from vsml_jax import network


def _cases():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 10)).astype(np.float32) * 5
    logits[0] = 3.0                      # all tied: argmax is the first
    logits[1, [2, 7]] = 50.0             # two tied maxima
    logits[2, 4] = np.nan                # not finite: never correct
    logits[3, 1] = np.inf
    logits[4] = 1e4                      # large: needs the max shift
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 64)]
    labels[1] = np.eye(10)[2]
    return jnp.asarray(logits), jnp.asarray(labels)


def test_unrolled_outputs_equal_library():
    logits, labels = _cases()
    lib = network._outputs_library(logits, labels)
    unr = network._outputs_unrolled(logits, labels)
    ok = np.isfinite(np.asarray(logits)).all(axis=-1)
    for a, b in zip(lib, unr):
        np.testing.assert_allclose(np.asarray(a)[ok], np.asarray(b)[ok], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(lib[2]), np.asarray(unr[2]))  # correct, all rows
    assert float(unr[2][0]) == float(labels[0, 0])
    assert float(unr[2][1]) == 1.0 and float(unr[2][2]) == 0.0 and float(unr[2][3]) == 0.0


def test_unrolled_outputs_same_gradient():
    logits, labels = _cases()
    logits, labels = logits[5:], labels[5:]
    grad = lambda f: jax.grad(lambda l: jnp.sum(f(l, labels)[1]) +
                              jnp.sum(jnp.exp(f(l, labels)[0]) ** 2))(logits)
    np.testing.assert_allclose(grad(network._outputs_unrolled),
                               grad(network._outputs_library), rtol=1e-5, atol=1e-6)


def test_slot_projection_equals_matmul_of_the_message():
    """The GPU form of the message projection (only the used slots) equals msg @ w."""
    from vsml_jax import grid
    from vsml_jax.config import VSMLConfig
    cfg = VSMLConfig(layer_sizes=(12, 5), feed_label=True, error_slot=2, label_slot=5)
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(cfg.msg_size, 4 * cfg.hidden_size)), jnp.float32)
    x = jnp.asarray(rng.normal(size=12), jnp.float32)
    e, lab = (jnp.asarray(rng.normal(size=5), jnp.float32) for _ in range(2))
    for msg, slots in ((network.input_message(cfg, x), (cfg.input_slot,)),
                       (network.error_message(cfg, e, lab), (cfg.error_slot, cfg.label_slot))):
        np.testing.assert_allclose(grid._project_slots(msg, w, slots), msg @ w,
                                   rtol=1e-6, atol=1e-6)
    # A slot left out is left out: the form relies on the other columns being zero.
    msg = network.error_message(cfg, e, lab)
    assert not np.allclose(grid._project_slots(msg, w, (cfg.error_slot,)), msg @ w)
