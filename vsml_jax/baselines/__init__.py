"""Baseline learners, all speaking the `vsml_jax.learners.Learner` interface.

- `online_gd`: online backprop (Adam / SGD) on y = W x + b, an MLP, or the
  y = tanh(x) W + b network of the cloning experiment (their learning rates
  are swept by `vsml_jax.evaluation.sweep_learning_rate`).
- `meta_rnn`: the Meta RNN of Hochreiter et al. (2001), one LSTM.
- `hebbian`: a learned local learning rule shared by all weights (eq. 9-12).
- `nonparametric`: nearest class mean, 1-nearest neighbour and the Parzen
  window, yardsticks with nothing learned (Parzen has one setting, its
  bandwidth).
"""
from vsml_jax.baselines.hebbian import HebbianConfig, hebbian_learner
from vsml_jax.baselines.meta_rnn import MetaRNNConfig, count_params, meta_rnn_learner
from vsml_jax.baselines.nonparametric import (NonparametricConfig,
                                              nearest_mean_learner,
                                              nearest_neighbour_learner,
                                              parzen_learner)
from vsml_jax.baselines.online_gd import (OnlineGDConfig, online_gd_learner,
                                          tanh_linear_learner)

__all__ = [
    "HebbianConfig", "hebbian_learner", "MetaRNNConfig", "count_params",
    "meta_rnn_learner", "NonparametricConfig", "nearest_mean_learner",
    "nearest_neighbour_learner", "parzen_learner", "OnlineGDConfig", "online_gd_learner",
    "tanh_linear_learner",
]
