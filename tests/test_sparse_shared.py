"""Theorem 1 (eq. 3, eq. 4, appendix A): the VS Meta RNN is a sparse, shared RNN."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsml_jax import sparse_shared as ss

ATOL = 1e-5
# W~ for a static grid side A, compiled once per shape.
w_tilde = jax.jit(ss.sparse_shared_matrix, static_argnums=2)


def _random_problem(seed, A, N):
    """b [N], W, C [N, N] and a state s [A, A, N], all float32."""
    # numpy draws: no per-shape compilation of random kernels.
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(N,))
    W = rng.normal(size=(N, N)) / np.sqrt(N)
    C = rng.normal(size=(N, N)) / np.sqrt(N)
    s = rng.uniform(-1.0, 1.0, size=(A, A, N))
    return tuple(jnp.asarray(x, jnp.float32) for x in (b, W, C, s))


def _eq3_numpy(b, W, C, s):
    """Eq. 3 (left) with explicit loops, in float64."""
    b, W, C, s = (np.asarray(x, np.float64) for x in (b, W, C, s))
    A, _, N = s.shape
    out = np.zeros_like(s)
    for a, bb, j in itertools.product(range(A), range(A), range(N)):
        total = b[j]
        for i in range(N):
            total += s[a, bb, i] * W[i, j]
            for c in range(A):
                total += s[c, a, i] * C[i, j]
        out[a, bb, j] = np.tanh(total)
    return out


@jax.jit
def _all_three(b, W, C, s):
    """Eq. 3 left, W~ and eq. 1 with it, and the library kernel (one compilation)."""
    A = s.shape[0]
    W_tilde = ss.sparse_shared_matrix(W, C, A)
    return (ss.vs_meta_rnn_step(b, W, C, s), W_tilde,
            ss.single_rnn_step(b, W_tilde, s.reshape(-1)),
            ss.library_vanilla_grid_step(C, W, b, s))


@pytest.mark.parametrize("A", [1, 2, 3, 5])
@pytest.mark.parametrize("N", [1, 3, 4])
def test_eq3_equals_single_rnn_and_library(A, N):
    b, W, C, s = _random_problem(10 * A + N, A, N)
    left, W_tilde, right, library = _all_three(b, W, C, s)
    assert left.shape == (A, A, N)
    assert W_tilde.shape == (A * A * N, A * A * N)
    np.testing.assert_allclose(left, right.reshape(A, A, N), atol=ATOL, rtol=0)
    np.testing.assert_allclose(library, left, atol=ATOL, rtol=0)

    # All three against an independent loop implementation.
    np.testing.assert_allclose(left, _eq3_numpy(b, W, C, s), atol=ATOL, rtol=0)


def test_the_interaction_matters():
    """Guards the test above against a degenerate C: dropping it changes the result."""
    b, W, C, s = _random_problem(0, 3, 4)

    @jax.jit
    def variants(b, W, C, s):
        with_c = ss.vs_meta_rnn_step(b, W, C, s)
        without_c = ss.vs_meta_rnn_step(b, W, jnp.zeros_like(C), s)
        # A wrong interaction (cells (a, c) instead of (c, a)).
        transposed = jnp.einsum("aci,ij->aj", s, C)[:, None, :]
        wrong = jnp.tanh(b + jnp.einsum("abi,ij->abj", s, W) + transposed)
        return with_c, without_c, wrong

    with_c, without_c, wrong = variants(b, W, C, s)
    assert np.max(np.abs(with_c - without_c)) > 1e-2
    assert np.max(np.abs(wrong - with_c)) > 1e-2


def test_other_activation():
    b, W, C, s = _random_problem(3, 3, 3)

    @jax.jit
    def both(b, W, C, s):
        left = ss.vs_meta_rnn_step(b, W, C, s, activation=jax.nn.relu)
        right = ss.single_rnn_step(b, ss.sparse_shared_matrix(W, C, 3), s.reshape(-1),
                                   activation=jax.nn.relu)
        return left, right.reshape(s.shape)

    left, right = both(b, W, C, s)
    np.testing.assert_allclose(left, right, atol=ATOL, rtol=0)


@pytest.mark.parametrize("A", [1, 2, 3])
def test_w_tilde_has_the_pattern_of_eq4(A):
    N = 2
    _, W, C, _ = _random_problem(A, A, N)
    W, C = np.asarray(W), np.asarray(C)
    W6 = np.asarray(w_tilde(jnp.asarray(W), jnp.asarray(C), A)).reshape(A, A, N, A, A, N)
    for c, d, i, a, b, j in itertools.product(range(A), range(A), range(N),
                                              range(A), range(A), range(N)):
        if d == a and (d != b or c != a):
            want = C[i, j]
        elif d != a and d == b and c == a:
            want = W[i, j]
        elif d == a and d == b and c == a:
            want = C[i, j] + W[i, j]
        else:
            want = 0.0
        assert W6[c, d, i, a, b, j] == pytest.approx(want, abs=1e-6), (c, d, i, a, b, j)


@pytest.mark.parametrize("A", [1, 2, 3, 4])
def test_sparsity_stats(A):
    N = 3
    _, W, C, _ = _random_problem(A, A, N)
    stats = ss.sparsity_stats(w_tilde(W, C, A), N)
    counts = ss.block_pattern_counts(A)
    assert sum(counts.values()) == A ** 4
    assert stats["num_blocks"] == A ** 4
    assert stats["num_zero_blocks"] == counts["zero"]
    assert stats["num_nonzero_blocks"] == counts["C"] + counts["W"] + counts["C+W"]
    # Only C, W and C + W occur (only C + W when A = 1).
    assert stats["num_distinct_blocks"] == (1 if A == 1 else 3)
    assert stats["fraction_zero"] == pytest.approx(counts["zero"] / A ** 4)


def test_a_equals_one_is_a_single_rnn():
    N = 4
    b, W, C, s = _random_problem(7, 1, N)
    left, W_tilde, _, _ = _all_three(b, W, C, s)
    np.testing.assert_allclose(W_tilde, W + C, atol=1e-7, rtol=0)
    eq1 = np.tanh(np.asarray(b) + np.asarray(s).reshape(N) @ np.asarray(W + C))
    np.testing.assert_allclose(left.reshape(N), eq1, atol=ATOL, rtol=0)


def test_bad_shapes_raise():
    # numpy slices: the checks fire on shapes, before any computation.
    b, W, C, s = (np.asarray(x) for x in _random_problem(0, 2, 3))
    with pytest.raises(ValueError, match="square grid"):
        ss.vs_meta_rnn_step(b, W, C, s[:, :1])
    with pytest.raises(ValueError, match="must be"):
        ss.vs_meta_rnn_step(b[:2], W, C, s)
    with pytest.raises(ValueError, match="must be"):
        ss.library_vanilla_grid_step(C, W[:, :2], b, s)
    with pytest.raises(ValueError, match="square"):
        ss.sparse_shared_matrix(W[:2], C, 2)
    with pytest.raises(ValueError, match="do not fit"):
        ss.single_rnn_step(b, np.zeros((12, 12), np.float32), s.reshape(-1)[:-1])
