"""The meta-objective of sec. 3.2: how well a Learner learns online.

A batch of `batch` episodes of length T is sampled from a dataset (with task
augmentation: a random label permutation per episode, optionally a random
projection of the inputs), every episode starts from a fresh random state of
the learner, and the meta-loss is the online cross-entropy averaged over time
and episodes. Each prediction y^_t is made before y_t is seen, so the loss
measures learning, not memorisation of a fixed task.

Everything is a pure function of (params, key): it can be differentiated
(gradient meta-training), vmapped over params (an evolution population) and
jitted. All randomness (episodes, initial states) comes from `key`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from vsml_jax.data import Dataset, sample_episodes
from vsml_jax.learners import Learner


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
    """How meta-training episodes are drawn (static: it decides shapes).

    Attributes:
      length: T, examples per episode.
      batch: episodes per meta-loss evaluation.
      permute_labels: random class permutation per episode (task augmentation).
      random_projection: random Gaussian input projection per episode (costs a
        [D, D] matrix per episode; use pooled inputs on small machines).
      min_classes: 0 (all classes) or 2..C: each episode shows k ~ U{min_classes..C}
        random classes (`vsml_jax.data.augment`).
      pixel_permute_prob: probability that an episode's inputs are shuffled by
        a random permutation (`vsml_jax.data.augment`).
      min_length: 0 (off: every episode has `length` steps) or 1..length:
        mixed episode lengths L ~ U{min_length..length}. Learners predict
        before they see a label, so an episode cut at L is the first L steps
        of a full one; the meta-loss is therefore the expectation over L of
        the per-episode mean CE, sum_t w_t CE_t with `length_weights` (exact
        in expectation, without the noise of drawing L).
    """
    length: int = 100
    batch: int = 4
    permute_labels: bool = True
    random_projection: bool = False
    min_classes: int = 0
    pixel_permute_prob: float = 0.0
    min_length: int = 0

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"EpisodeSpec: length={self.length} must be >= 1.")
        if self.batch < 1:
            raise ValueError(f"EpisodeSpec: batch={self.batch} must be >= 1.")
        if not 0 <= self.min_length <= self.length:
            raise ValueError(f"EpisodeSpec: min_length={self.min_length} must be 0 (off) "
                             f"or in 1..length={self.length}.")


def sample_batch(key: jax.Array, data: Dataset, spec: EpisodeSpec
                 ) -> Tuple[jax.Array, jax.Array]:
    """Episodes for one meta-loss: inputs [batch, T, D], labels one-hot [batch, T, C]."""
    if spec.min_classes or spec.pixel_permute_prob > 0.0:
        from vsml_jax.data import augment
        if spec.random_projection or len(data.parts) > 1:
            raise ValueError("class subsets / pixel permutations work on one data set "
                             "without random_projection; switch one of them off.")
        return augment.sample_augmented_episodes(
            key, data.images, data.labels, spec.length, spec.batch,
            permute_labels=spec.permute_labels, min_classes=spec.min_classes,
            pixel_permute_prob=spec.pixel_permute_prob, num_classes=data.num_classes)
    return sample_episodes(key, data, spec.length, spec.batch,
                           permute_labels=spec.permute_labels,
                           random_projection=spec.random_projection)


def length_weights(length: int, min_length: int) -> np.ndarray:
    """Per-step weights [T] of the mixed-length meta-loss (they sum to 1).

    w_t = E_L[1{t < L} / L] for L ~ U{min_length..T} (t = 0..T-1): the
    expected weight of step t in the mean CE of an episode cut at L. Uniform
    1/T when min_length is 0 or T.
    """
    if not 0 <= min_length <= length:
        raise ValueError(f"min_length={min_length} must be 0 (off) or in 1..{length}.")
    if min_length in (0, length):
        return np.full(length, 1.0 / length)
    lengths = np.arange(min_length, length + 1)                      # [K]
    mask = np.arange(length)[None, :] < lengths[:, None]             # [K, T]
    return (mask / lengths[:, None]).mean(axis=0)


def episodes_mean(learner: Learner, params: Any, keys: jax.Array, inputs: jax.Array,
                  labels: jax.Array, step_weights: Optional[jax.Array] = None
                  ) -> Tuple[jax.Array, jax.Array]:
    """(mean online CE [], mean online accuracy []) of episodes on one device.

    Args:
      keys: raw PRNG keys [E, 2], one initial state per episode.
      inputs: [E, T, D]; labels: one-hot [E, T, C].
      step_weights: None (plain mean over steps) or [T] weights summing to 1
        (`length_weights`): the CE is sum_t w_t CE_t, averaged over episodes.
        The accuracy stays the plain mean.
    """
    states = jax.vmap(learner.init_state)(keys)

    def run(state, x, y):
        _, out = learner.unroll(params, state, (x, y))
        return out.loss, out.correct

    losses, correct = jax.vmap(run)(states, inputs, labels)
    losses = losses.astype(jnp.float32)
    if step_weights is None:
        loss = jnp.mean(losses)
    else:
        loss = jnp.mean(losses @ jnp.asarray(step_weights, jnp.float32))
    return loss, jnp.mean(correct.astype(jnp.float32))


def episodes_loss(learner: Learner, params: Any, key: jax.Array,
                  episodes: Tuple[jax.Array, jax.Array], mesh: Optional[Mesh] = None,
                  step_weights: Optional[jax.Array] = None
                  ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Mean online CE of `learner` on given episodes, fresh states from `key`.

    Args:
      learner: any `vsml_jax.learners.Learner`.
      params: its meta variables.
      key: PRNG key for the initial states (one per episode).
      episodes: (inputs [E, T, D], labels one-hot [E, T, C]).
      mesh: split the E episodes over this device mesh (data parallelism; E
        must be a multiple of its size): each device runs its share with the
        same per-episode program as without a mesh (`jax.shard_map`), and the
        means are averaged once. The numbers do not depend on it beyond float
        reassociation of the mean.
      step_weights: None or [T] per-step weights of the CE (`episodes_mean`).
    Returns:
      (loss [], {"loss": [], "accuracy": []}); accuracy is the mean online
      accuracy over all steps and episodes.
    """
    inputs, labels = episodes
    # One key per episode, split globally: the same initial states whatever
    # the number of devices.
    keys = jax.random.split(key, inputs.shape[0])
    mean_over = lambda *args: episodes_mean(learner, *args, step_weights=step_weights)

    if mesh is None or mesh.devices.size == 1:
        loss, accuracy = mean_over(params, keys, inputs, labels)
    else:
        # shard_map rather than sharding constraints alone: XLA's propagation
        # through the scanned unroll put an all-gather into every time step
        # (measured); here the only collective is one mean of the results
        # (and, under grad, one of the gradient).
        axis = mesh.axis_names[0]

        def local(params, keys, inputs, labels):
            return jax.lax.pmean(mean_over(params, keys, inputs, labels), axis)

        loss, accuracy = jax.shard_map(
            local, mesh=mesh, in_specs=(P(), P(axis), P(axis), P(axis)),
            out_specs=P(), check_vma=False)(params, keys, inputs, labels)
    return loss, {"loss": loss, "accuracy": accuracy}


def episode_batch_loss(learner: Learner, params: Any, key: jax.Array, data: Dataset,
                       spec: EpisodeSpec, mesh: Optional[Mesh] = None
                       ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """The meta-loss: sample `spec.batch` episodes from `data` with `key`, run them.

    Args:
      learner: the Learner being meta-trained. For VS-ML, memory-saving
        rematerialisation is chosen when the learner is built
        (`vsml_learner(cfg, remat=True, remat_chunk=...)`).
      params: meta variables of the learner.
      key: PRNG key; it decides the episodes and the initial states.
      data: a `vsml_jax.data.Dataset` with images [N, D] and labels [N].
      spec: episode length, batch and task augmentation.
      mesh: split the batch of episodes over this mesh (see `episodes_loss`).
    Returns:
      (loss [], metrics {"loss", "accuracy"}).
    """
    k_data, k_state = jax.random.split(key)
    weights = length_weights(spec.length, spec.min_length) if spec.min_length else None
    return episodes_loss(learner, params, k_state, sample_batch(k_data, data, spec), mesh,
                         step_weights=weights)


def meta_test_accuracy(learner: Learner, params: Any, key: jax.Array, data: Dataset,
                       length: int, episodes: int = 1,
                       checkpoints: Tuple[int, ...] = (100, 500, 1000, 2000)
                       ) -> Dict[str, jax.Array]:
    """Cumulative online accuracy of `learner` on held-out episodes (meta-test).

    The labels are not permuted: this is the plain online learning problem of
    the dataset (e.g. MNIST test), learned from scratch from a fresh state.

    Args:
      key: decides the episodes and initial states (keep it fixed across evals
        so that numbers at different steps are comparable).
      data: test dataset, images [N, D] with D the learner's input size.
      length: T of each episode (examples seen).
      episodes: number of independent episodes averaged.
      checkpoints: the N at which the cumulative accuracy is reported (those
        <= length).
    Returns:
      {"acc@N": mean over episodes of the fraction correct in the first N
      predictions, ..., "loss": mean online CE}.
    """
    spec = EpisodeSpec(length=length, batch=episodes, permute_labels=False)
    k_data, k_state = jax.random.split(key)
    inputs, labels = sample_batch(k_data, data, spec)
    states = jax.vmap(learner.init_state)(jax.random.split(k_state, episodes))

    def run(state, x, y):
        _, out = learner.unroll(params, state, (x, y))
        return out.loss, out.correct

    losses, correct = jax.vmap(run)(states, inputs, labels)
    cum = jnp.cumsum(correct.astype(jnp.float32), axis=1)  # [E, T]
    result = {"loss": jnp.mean(losses.astype(jnp.float32))}
    for n in checkpoints:
        if n <= length:
            result[f"acc@{n}"] = jnp.mean(cum[:, n - 1] / n)
    return result
