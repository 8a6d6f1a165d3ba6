"""Meta-training of learners (paper sec. 3.2): objective and meta-optimisers.

- `objective`: the meta-loss of a Learner on a batch of sampled episodes, and
  the meta-test (cumulative online accuracy).
- `gradient`: BPTT through the episodes with optax (Adam/SGD, clipping).
- `evolution`: evosax strategies (CMA-ES, OpenAI-ES, ...), population
  evaluated with vmap and optionally sharded (`sharding`).

Each meta-optimiser provides `make_init_fn` / `make_step_fn` for
`vsml_jax.training.loop.run`, and `make_step` (the same step as a
`sharding.StepProgram`: the jitted function of (state, data) and its host
data, for ahead-of-time compilation by `vsml_jax.runs.plan`). Submodules are imported on demand so that using
one meta-optimiser does not load the others' dependencies.
"""
