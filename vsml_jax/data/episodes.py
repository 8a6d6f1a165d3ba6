"""Datasets as JAX arrays and the sampling of learning episodes from them.

A VS-ML learner is meta-tested by running it on an *episode*: a sequence of T
examples (x_t, y_t) drawn from one dataset, which it has to learn online. Task
augmentation (a random permutation of the classes, a random projection of the
inputs) turns one dataset into many tasks for meta-training.

A `Dataset` may be a mixture of several data sets (`make_mixture`): each
episode is then drawn from one of them, chosen uniformly at random per episode.

Everything here is pure JAX and deterministic given a PRNG key. Shapes:

    N  examples in a dataset       D  input size (784, 196 or 49)
    T  episode length              C  number of classes (10 for MNIST)
    B  episodes in a batch         P  data sets in a mixture
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

# Re-exported: they used to live here.
from vsml_jax.data.images import (  # noqa: F401
    PIXEL_MEAN,
    PIXEL_STD,
    normalize,
    normalize_images,
    pool_images,
)


class DatasetPart(NamedTuple):
    """One data set inside a mixture (static metadata, hashable).

    Attributes:
      name: e.g. "mnist" or "npz:letters.npz".
      source: the folder / file / tfds set it was read from.
      size: its N_p rows, stored contiguously after the parts before it.
      num_classes: its own C_p (<= the mixture's C).
    """
    name: str
    source: str
    size: int
    num_classes: int


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["images", "labels"],
    meta_fields=["num_classes", "name", "source", "parts"])
@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A supervised dataset held as JAX arrays (a pytree, so it can enter jit).

    Attributes:
      images: float32 [N, D] inputs, already normalised and flattened.
      labels: int32 [N] class indices in 0..num_classes-1.
      num_classes: C (static).
      name: e.g. "mnist" (static, for logging).
      source: where the data was read from, e.g. the IDX folder (static).
      parts: () for one data set; for a mixture of P data sets, P
        `DatasetPart`s whose rows lie one after the other in images/labels
        (static). Episodes are then drawn from one part each.
    """

    images: jax.Array
    labels: jax.Array
    num_classes: int = 10
    name: str = ""
    source: str = ""
    parts: Tuple[DatasetPart, ...] = ()

    @property
    def num_examples(self) -> int:
        """N."""
        return self.images.shape[0]

    @property
    def input_dim(self) -> int:
        """D."""
        return self.images.shape[1]

    def part_offsets(self) -> np.ndarray:
        """int [P] first row of each part (empty for a single data set)."""
        sizes = [p.size for p in self.parts]
        return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if sizes \
            else np.zeros((0,), np.int64)


ArraysLike = Union[Dataset, Tuple[jax.Array, jax.Array]]


def make_mixture(datasets: Sequence[Dataset], name: Optional[str] = None) -> Dataset:
    """One Dataset from several, sampled one data set per episode.

    Episodes drawn from the result (`sample_episode(s)`, and so
    `vsml_jax.meta.objective.sample_batch`) come from one data set each, chosen
    uniformly at random per episode (not in proportion to the sizes). Streams
    from `vsml_jax.evaluation.make_streams` do the same per seed.

    Args:
      datasets: Datasets with the same input size D (build them with the same
        pool / input_size); mixtures among them are flattened into their parts.
      name: default the names joined by "+".

    Returns:
      Dataset with images [sum N_p, D], labels [sum N_p], C = max C_p (with
      permute_labels an episode's labels are permuted among all C), and
      `parts` describing where each data set lies. A single data set is
      returned unchanged.
    """
    datasets = list(datasets)
    if not datasets:
        raise ValueError("make_mixture needs at least one Dataset.")
    if len(datasets) == 1:
        return datasets[0]
    dims = sorted({d.input_dim for d in datasets})
    if len(dims) > 1:
        listing = ", ".join(f"{d.name or '?'}: {d.input_dim}" for d in datasets)
        raise ValueError(f"make_mixture: the data sets have different input sizes "
                         f"({listing}); load them with the same pool / input_size.")
    parts = []
    for d in datasets:
        parts.extend(d.parts or [DatasetPart(d.name, d.source, d.num_examples,
                                             d.num_classes)])
    return Dataset(
        images=jnp.concatenate([jnp.asarray(d.images, jnp.float32) for d in datasets]),
        labels=jnp.concatenate([jnp.asarray(d.labels, jnp.int32) for d in datasets]),
        num_classes=max(d.num_classes for d in datasets),
        name=name or "+".join(p.name for p in parts),
        source="; ".join(p.source for p in parts),
        parts=tuple(parts))


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


def _draw_part_indices(k_part: jax.Array, k_idx: jax.Array, parts, length: int,
                       replace: Optional[bool]) -> jax.Array:
    """[length] indices into one part of a mixture, the part uniformly at random.

    Like `_draw_indices` within the part: without replacement (default when
    length <= the smallest part, a static choice) the top-`length` of uniform
    variates, those outside the part pushed below every other.
    """
    sizes = np.asarray([p.size for p in parts])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n = int(sizes.sum())
    part = jax.random.randint(k_part, (), 0, len(parts))
    start, size = jnp.asarray(offsets)[part], jnp.asarray(sizes)[part]
    if replace is None:
        replace = length > int(sizes.min())
    if replace:
        return start + jax.random.randint(k_idx, (length,), 0, size)
    if length > int(sizes.min()):
        raise ValueError(f"cannot draw {length} examples without replacement from the "
                         f"smallest data set of the mixture ({int(sizes.min())} "
                         "examples); use replace=True or a shorter episode.")
    rows = jnp.arange(n)
    inside = (rows >= start) & (rows < start + size)
    _, idx = jax.lax.top_k(jnp.where(inside, jax.random.uniform(k_idx, (n,)), -1.0), length)
    return idx


def _sample_episode(key, data, length, permute_labels, random_projection,
                    num_classes, replace):
    images, labels, c = _arrays(data, num_classes)
    parts = data.parts if isinstance(data, Dataset) else ()
    if len(parts) > 1:
        # Only mixtures split off a key for the part: single data sets keep
        # exactly the episodes they always had.
        k_part, key = jax.random.split(key)
    # Always split three ways so that switching an augmentation on or off does
    # not change which examples an episode contains.
    k_idx, k_perm, k_proj = jax.random.split(key, 3)
    if len(parts) > 1:
        idx = _draw_part_indices(k_part, k_idx, parts, length, replace)
    else:
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
        From a mixture (`make_mixture`) the episode comes from one of its data
        sets, chosen uniformly at random from the key.
      length: T (static).
      permute_labels: relabel the classes by a random permutation drawn per
        episode (task augmentation: the learner cannot memorise class ids).
      random_projection: multiply the inputs by a per-episode Gaussian matrix
        [D, D] with entries N(0, 1/D), which preserves their scale on average.
      num_classes: C; default the Dataset's, or 10 for a bare pair.
      replace: draw with replacement; default only when T > N (for a mixture,
        when T exceeds its smallest data set).

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
