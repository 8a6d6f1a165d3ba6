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
    """
    length: int = 100
    batch: int = 4
    permute_labels: bool = True
    random_projection: bool = False

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"EpisodeSpec: length={self.length} must be >= 1.")
        if self.batch < 1:
            raise ValueError(f"EpisodeSpec: batch={self.batch} must be >= 1.")


def sample_batch(key: jax.Array, data: Dataset, spec: EpisodeSpec
                 ) -> Tuple[jax.Array, jax.Array]:
    """Episodes for one meta-loss: inputs [batch, T, D], labels one-hot [batch, T, C]."""
    return sample_episodes(key, data, spec.length, spec.batch,
                           permute_labels=spec.permute_labels,
                           random_projection=spec.random_projection)


def episodes_loss(learner: Learner, params: Any, key: jax.Array,
                  episodes: Tuple[jax.Array, jax.Array], mesh: Optional[Mesh] = None
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
    Returns:
      (loss [], {"loss": [], "accuracy": []}); accuracy is the mean online
      accuracy over all steps and episodes.
    """
    inputs, labels = episodes
    # One key per episode, split globally: the same initial states whatever
    # the number of devices.
    keys = jax.random.split(key, inputs.shape[0])

    def mean_over(params, keys, inputs, labels):
        states = jax.vmap(learner.init_state)(keys)

        def run(state, x, y):
            _, out = learner.unroll(params, state, (x, y))
            return out.loss, out.correct

        losses, correct = jax.vmap(run)(states, inputs, labels)
        return (jnp.mean(losses.astype(jnp.float32)),
                jnp.mean(correct.astype(jnp.float32)))

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
    return episodes_loss(learner, params, k_state, sample_batch(k_data, data, spec), mesh)


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
