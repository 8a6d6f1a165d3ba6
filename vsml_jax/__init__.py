"""vsml_jax: Variable Shared Meta Learning in JAX.

    cfg = vsml_jax.VSMLConfig(layer_sizes=(784, 10), hidden_size=16, msg_size=8)
    params = vsml_jax.init_params(jax.random.key(0), cfg)   # V_M
    state = vsml_jax.init_state(jax.random.key(1), cfg)     # V_L
    state, out = vsml_jax.unroll(params, state, (inputs, labels))

Values are not checked on that path; `vsml_jax.checked_unroll` (checkify, works
under jit) and the host-side validators of `vsml_jax.checks` check them.
"""
from vsml_jax import checks
from vsml_jax.checks import checked_unroll
from vsml_jax.config import VSMLConfig
from vsml_jax.network import (StepOutput, correct_from_logits, forward_pass,
                              init_state_for_streams, predict_pass, meta_loss, step, unroll)
from vsml_jax.params import CellParams, VSMLParams, count_meta_variables, init_params
from vsml_jax.state import (LayerState, VSMLState, count_learned_variables, init_state,
                            init_states)

__version__ = "0.1.0"

__all__ = [
    "VSMLConfig", "VSMLParams", "CellParams", "VSMLState", "LayerState", "StepOutput",
    "init_params", "init_state", "init_states", "init_state_for_streams", "unroll",
    "step", "forward_pass", "predict_pass", "meta_loss", "count_meta_variables",
    "count_learned_variables", "checked_unroll", "correct_from_logits", "checks",
]
