"""Datasets as JAX arrays and the sampling of learning episodes from them.

A VS-ML learner is meta-tested by running it on an *episode*: a sequence of T
examples (x_t, y_t) drawn from one dataset, which it has to learn online. Task
augmentation (a random permutation of the classes, a random projection of the
inputs) turns one dataset into many tasks for meta-training.

Everything here is pure JAX and deterministic given a PRNG key. Shapes:

    N  examples in a dataset       D  input size (784, 196 or 49)
    T  episode length              C  number of classes (10)
    B  episodes in a batch
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from vsml_jax.data.sources import load_dataset

# Statistics used by the original VS-ML code for MNIST and Fashion-MNIST alike
# (pixels scaled to [0, 1] first). One shared normalisation keeps inputs on the
# same scale across datasets, which meta-generalisation to unseen datasets needs.
PIXEL_MEAN = 0.13066047430038452
PIXEL_STD = 0.3081078827381134


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["images", "labels"], meta_fields=["num_classes", "name"])
@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A supervised dataset held as JAX arrays (a pytree, so it can enter jit).

    Attributes:
      images: float32 [N, D] inputs, already normalised and flattened.
      labels: int32 [N] class indices in 0..num_classes-1.
      num_classes: C (static).
      name: e.g. "mnist" (static, for logging).
    """

    images: jax.Array
    labels: jax.Array
    num_classes: int = 10
    name: str = ""

    @property
    def num_examples(self) -> int:
        """N."""
        return self.images.shape[0]

    @property
    def input_dim(self) -> int:
        """D."""
        return self.images.shape[1]


ArraysLike = Union[Dataset, Tuple[jax.Array, jax.Array]]


# ------------------------------------------------------------ preprocessing
def pool_images(images: jax.Array, pool: int) -> jax.Array:
    """Average-pools square images over non-overlapping pool x pool blocks.

    Args:
      images: [N, S, S] float images.
      pool: block size; must divide S (for 28x28: 1, 2, 4, 7, 14, 28).

    Returns:
      [N, S // pool, S // pool]; e.g. pool=4 turns 28x28 into 7x7 (49 inputs),
      which keeps CPU experiments small.
    """
    n, h, w = images.shape
    if pool < 1 or h % pool or w % pool:
        raise ValueError(f"pool={pool} must be a positive divisor of the image size "
                         f"{h}x{w}; use 1 (784 inputs), 2 (196) or 4 (49).")
    if pool == 1:
        return images
    return images.reshape(n, h // pool, pool, w // pool, pool).mean(axis=(2, 4))


@functools.partial(jax.jit, static_argnames="pool")
def normalize_images(images: jax.Array, pool: int = 1) -> jax.Array:
    """Turns uint8 images into the network's inputs.

    pixels / 255, optional average pooling, then (x - PIXEL_MEAN) / PIXEL_STD,
    then flattening. (Pooling commutes with the affine normalisation, so its
    position does not change the result; it must come before flattening.)

    Args:
      images: uint8 [N, 28, 28].
      pool: 1, 2 or 4 (see `pool_images`).

    Returns:
      float32 [N, (28 // pool) ** 2], i.e. [N, 784], [N, 196] or [N, 49].
    """
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    x = pool_images(x, pool)
    x = (x - PIXEL_MEAN) / PIXEL_STD
    return x.reshape(x.shape[0], -1)


def make_dataset(name: str, split: str, data_dir: Optional[str] = None, pool: int = 1,
                 download: bool = False) -> Dataset:
    """Loads MNIST or Fashion-MNIST and normalises it (see `load_dataset`).

    Args:
      name: "mnist" or "fashion_mnist".
      split: "train" or "test".
      data_dir: folder with ``<name>/`` sub-folders (else $VSML_DATA_DIR, ...).
      pool: 1, 2 or 4 -> D = 784, 196 or 49.
      download: fetch the files if no copy is found.

    Returns:
      Dataset with images float32 [N, D] and labels int32 [N], C = 10.
    """
    images, labels = load_dataset(name, split, data_dir=data_dir, download=download)
    return Dataset(images=normalize_images(images, pool=pool),
                   labels=jnp.asarray(labels, dtype=jnp.int32), num_classes=10,
                   name=name)


@functools.partial(jax.jit, static_argnames=("num_examples", "input_dim", "num_classes"))
def synthetic_dataset(key: jax.Array, num_examples: int, input_dim: int,
                      num_classes: int = 10) -> Dataset:
    """Random Gaussian inputs with uniformly random labels.

    There is nothing to generalise in it, so a learner can only fit it by
    memorising within an episode: a cheap meta-training task and a sanity check
    that needs no files. It is labelled "synthetic" and is never substituted for
    a missing real dataset.

    Args:
      key: PRNG key.
      num_examples: N.
      input_dim: D.
      num_classes: C.

    Returns:
      Dataset with images float32 [N, D] ~ N(0, 1) and labels int32 [N].
      (Jitted with N, D, C static: one compiled call instead of several.)
    """
    k_x, k_y = jax.random.split(key)
    images = jax.random.normal(k_x, (num_examples, input_dim), dtype=jnp.float32)
    labels = jax.random.randint(k_y, (num_examples,), 0, num_classes, dtype=jnp.int32)
    return Dataset(images=images, labels=labels, num_classes=num_classes,
                   name="synthetic")


# ----------------------------------------------------------------- episodes
def _arrays(data: ArraysLike, num_classes: Optional[int]) -> Tuple[jax.Array, jax.Array, int]:
    if isinstance(data, Dataset):
        return data.images, data.labels, num_classes or data.num_classes
    images, labels = data
    return jnp.asarray(images), jnp.asarray(labels), num_classes or 10


def _draw_indices(key: jax.Array, n: int, length: int, replace: Optional[bool]) -> jax.Array:
    """[length] indices into 0..n-1, uniformly at random.

    Without replacement (the default when length <= n) the indices are the
    top-`length` of n uniform variates: a uniform random subset in random
    order, at O(n) cost instead of the full shuffle that
    `jax.random.choice(replace=False)` performs. (float32 variates tie now and
    then; a tie only decides which of two rows wins a place, a negligible
    bias, and integer keys would make top_k about ten times slower on CPU.)
    """
    if replace is None:
        replace = length > n
    if replace:
        return jax.random.randint(key, (length,), 0, n)
    if length > n:
        raise ValueError(f"cannot draw {length} examples without replacement from "
                         f"{n}; use replace=True or a shorter episode.")
    _, idx = jax.lax.top_k(jax.random.uniform(key, (n,)), length)
    return idx


def _sample_episode(key, data, length, permute_labels, random_projection,
                    num_classes, replace):
    images, labels, c = _arrays(data, num_classes)
    # Always split three ways so that switching an augmentation on or off does
    # not change which examples an episode contains.
    k_idx, k_perm, k_proj = jax.random.split(key, 3)
    idx = _draw_indices(k_idx, images.shape[0], length, replace)
    x = images[idx].astype(jnp.float32)
    y = labels[idx]
    if permute_labels:
        y = jax.random.permutation(k_perm, c)[y]
    if random_projection:
        d = x.shape[1]
        w = jax.random.normal(k_proj, (d, d), dtype=jnp.float32) / np.sqrt(d)
        x = x @ w
    return x, jax.nn.one_hot(y, c, dtype=jnp.float32)


_STATIC = ("length", "permute_labels", "random_projection", "num_classes", "replace")


@functools.partial(jax.jit, static_argnames=_STATIC)
def sample_episode(key: jax.Array, dataset_arrays: ArraysLike, length: int, *,
                   permute_labels: bool = False, random_projection: bool = False,
                   num_classes: Optional[int] = None,
                   replace: Optional[bool] = None) -> Tuple[jax.Array, jax.Array]:
    """Draws one episode of `length` examples.

    Args:
      key: PRNG key; the same key gives the same episode.
      dataset_arrays: a `Dataset`, or a pair (images [N, D], labels int [N]).
      length: T (static).
      permute_labels: relabel the classes by a random permutation drawn per
        episode (task augmentation: the learner cannot memorise class ids).
      random_projection: multiply the inputs by a per-episode Gaussian matrix
        [D, D] with entries N(0, 1/D), which preserves their scale on average.
      num_classes: C; default the Dataset's, or 10 for a bare pair.
      replace: draw with replacement; default only when T > N.

    Returns:
      inputs float32 [T, D] and labels_onehot float32 [T, C].
    """
    return _sample_episode(key, dataset_arrays, length, permute_labels,
                           random_projection, num_classes, replace)


@functools.partial(jax.jit, static_argnames=_STATIC + ("batch",))
def sample_episodes(key: jax.Array, data: ArraysLike, length: int, batch: int, *,
                    permute_labels: bool = False, random_projection: bool = False,
                    num_classes: Optional[int] = None,
                    replace: Optional[bool] = None) -> Tuple[jax.Array, jax.Array]:
    """Draws a batch of independent episodes (vmap of `sample_episode`).

    Args:
      key: PRNG key, split into `batch` episode keys.
      data, length, permute_labels, random_projection, num_classes, replace:
        as in `sample_episode`.
      batch: B (static).

    Returns:
      inputs float32 [B, T, D] and labels_onehot float32 [B, T, C].
      Note: random_projection materialises B matrices of D x D floats
      (B=128, D=784: 315 MB); use pooled inputs on small machines.
    """
    keys = jax.random.split(key, batch)
    return jax.vmap(lambda k: _sample_episode(k, data, length, permute_labels,
                                              random_projection, num_classes,
                                              replace))(keys)
