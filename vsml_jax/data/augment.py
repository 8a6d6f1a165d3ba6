"""Task augmentation for meta-training beyond the label permutation.

`vsml_jax.data.episodes.sample_episodes` draws episodes from one data set,
with a random label permutation and (optionally) a random Gaussian input
projection per episode. This module adds what makes a learned learner meet
many more tasks than one data set holds:

- class subsets: an episode shows only k classes, k ~ U{min_classes..C}
  (with the label permutation their ids are random among all C);
- pixel permutations: with probability `pixel_permute_prob` an episode's
  inputs are shuffled by one random permutation of the D inputs (a task with
  the same statistics per input but another arrangement);

Pure JAX, deterministic given the key. Shapes: N examples, D inputs,
C classes, T steps, B episodes.
"""
from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp


def _subset_indices(key: jax.Array, labels: jax.Array, num_classes: int, length: int,
                    min_classes: int) -> jax.Array:
    """[length] indices of examples whose label lies in a random class subset.

    k ~ U{min_classes..C} classes are picked uniformly; the examples are the
    top-`length` of uniform variates with every other class pushed below
    (drawn without replacement while the subset holds enough examples, and
    examples of other classes can only fill up a shortfall).
    """
    k_k, k_cls, k_idx = jax.random.split(key, 3)
    k = jax.random.randint(k_k, (), min_classes, num_classes + 1)
    rank = jnp.argsort(jax.random.uniform(k_cls, (num_classes,)))  # class -> rank
    chosen = rank < k                                                # [C]
    u = jax.random.uniform(k_idx, labels.shape)
    _, idx = jax.lax.top_k(jnp.where(chosen[labels], u, u - 2.0), length)
    return idx


@functools.partial(jax.jit, static_argnames=(
    "length", "batch", "permute_labels", "min_classes", "pixel_permute_prob",
    "num_classes"))
def sample_augmented_episodes(key: jax.Array, images: jax.Array, labels: jax.Array,
                              length: int, batch: int, *, permute_labels: bool = True,
                              min_classes: int = 0, pixel_permute_prob: float = 0.0,
                              num_classes: int = 10) -> Tuple[jax.Array, jax.Array]:
    """B episodes with class subsets and pixel permutations.

    Args:
      images: float32 [N, D]; labels: int [N] in 0..C-1.
      length: T; batch: B.
      permute_labels: random class permutation per episode.
      min_classes: 0 (off: all C classes) or 2..C: each episode shows
        k ~ U{min_classes..C} classes.
      pixel_permute_prob: probability that an episode's D inputs are shuffled
        by a random permutation.
      num_classes: C.
    Returns:
      inputs float32 [B, T, D], labels one-hot float32 [B, T, C].
    """
    if min_classes and not 2 <= min_classes <= num_classes:
        raise ValueError(f"min_classes={min_classes} must be 0 (off) or in 2..{num_classes}.")
    if not 0.0 <= pixel_permute_prob <= 1.0:
        raise ValueError(f"pixel_permute_prob={pixel_permute_prob} must be in [0, 1].")

    def one(k):
        k_idx, k_lab, k_pix, k_do = jax.random.split(k, 4)
        if min_classes:
            idx = _subset_indices(k_idx, labels, num_classes, length, min_classes)
        else:
            _, idx = jax.lax.top_k(jax.random.uniform(k_idx, labels.shape), length)
        x = images[idx].astype(jnp.float32)
        y = labels[idx]
        if permute_labels:
            y = jax.random.permutation(k_lab, num_classes)[y]
        if pixel_permute_prob > 0.0:
            perm = jax.random.permutation(k_pix, x.shape[1])
            x = jnp.where(jax.random.uniform(k_do) < pixel_permute_prob, x[:, perm], x)
        return x, jax.nn.one_hot(y, num_classes, dtype=jnp.float32)

    return jax.vmap(one)(jax.random.split(key, batch))

