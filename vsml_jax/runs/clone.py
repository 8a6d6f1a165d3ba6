"""Learning-algorithm cloning (paper sec. 3.1, appendix B, table 1) as a library call.

    runtime.start()
    outcome = train_and_evaluate(CloneConfig(stage="backprop", num_steps=2000),
                                 "runs/clone_bp")

Optimises V_M with Adam on random data so that every LSTM cell stores a
weight w and bias b, computes y = tanh(x) w + b (stage "forward", eq. 13) and,
for stage "backprop", applies w <- w - lr e tanh(x), b <- b - lr e and sends
back e' = e w (1 - tanh(x)^2) (see `vsml_jax.cloning` for the conventions).
The K training cells persist from step to step (restarting with probability
`reset_prob`) so that states of every age are trained; they are split over
all devices of all processes (data parallelism; K must be a multiple of the
number of devices), V_M and the optimiser state are replicated.

Everything goes to the workdir (`vsml_jax.training.loop`). Every
`eval_every` steps two evaluations are logged: split "eval" (the cloning
metrics on a fixed batch of fresh cells) and "eval_long" (errors after a
free run of `eval_long_steps` steps). The portable learner
(params.msgpack + learner.json, a `VSMLConfig` for a `meta_test_layer_sizes`
network) is written at every checkpoint, so `experiments.evaluate
--checkpoint=WORKDIR` meta-tests the cloned learning algorithm.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Optional, Tuple

import numpy as np
from absl import logging

from vsml_jax import cloning
from vsml_jax.runs.common import (RunOutcome, SettingsError, check_choices, check_ranges,
                                  recent_evals, rerun_command, where_it_runs,
                                  write_portable)

STAGES = cloning.STAGES
# Settings that may change on resume (recorded in config.json).
SAFE_TO_CHANGE = ("num_steps", "checkpoint_every", "log_every", "eval_every",
                  "eval_cells", "eval_long_steps", "lr", "lr_decay_steps",
                  "lr_final_fraction", "clip_norm")
# CloneSpec field -> CloneConfig field (and flag) where the names differ: the
# run's own `lr` (Adam) and `num_steps` would otherwise be ambiguous.
SPEC_RENAMES = {"lr": "rule_lr", "steps": "unroll_steps"}


# Fields added after cloning runs were first written: config.json leaves them
# out at their default, so that an older run's config still matches and it
# resumes (a run that sets them records them).
LATER_FIELDS = ("log_count_scale", "count_max", "input_tanh")


def _config_name(spec_field: str) -> str:
    return SPEC_RENAMES.get(spec_field, spec_field)


# What is cloned, on which data: every field of cloning.CloneSpec (renamed as
# above, same defaults), so that a field added there is a flag, a config.json
# entry and part of `spec()` without being listed again.
_CloneSpecFields = dataclasses.make_dataclass(
    "_CloneSpecFields",
    [(_config_name(f.name), f.type, dataclasses.field(default=f.default))
     for f in dataclasses.fields(cloning.CloneSpec)],
    frozen=True)


@dataclasses.dataclass(frozen=True)
class CloneConfig(_CloneSpecFields):
    """Everything that defines a cloning run (the flags of experiments.clone):
    the fields of `cloning.CloneSpec` (`lr` as rule_lr, `steps` as
    unroll_steps; inherited, so they come first) and those below."""
    stage: str = "backprop"
    # The cell (V_M shapes) and the meta-test network it is saved for.
    hidden_size: int = 32
    msg_size: int = 4
    micro_ticks: int = 2
    meta_test_layer_sizes: Tuple[int, ...] = (784, 10)
    w_init_std: float = 0.0
    error_scale: float = 1.0
    # Stage nearest_mean: logits = logit_scale * mean_a (x_a m_ab - m_ab^2 / 2).
    logit_scale: float = 30.0
    # Optimisation.
    batch_size: int = 256
    num_steps: int = 10000
    lr: float = 5e-3
    lr_final_fraction: float = 1.0
    lr_decay_steps: int = 0
    clip_norm: float = 0.0
    reset_prob: float = 0.01
    max_drift: float = 3.0
    learned_encoding: bool = True
    init_checkpoint: Optional[str] = None
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 100
    eval_every: int = 1000
    eval_cells: int = 512
    eval_long_steps: int = 300

    def __post_init__(self):
        check_choices(self, {"stage": STAGES})
        check_ranges(self, {
            "hidden_size": (1, None), "msg_size": (1, None), "micro_ticks": (1, None),
            "w_init_std": (0, None), "error_scale": (0, None, "> 0"),
            "logit_scale": (0, None, "> 0"), "batch_size": (1, None), "num_steps": (0, None),
            "lr": (0, None, "> 0"), "lr_final_fraction": (0, 1),
            "lr_decay_steps": (0, None), "clip_norm": (0, None), "reset_prob": (0, 1),
            "max_drift": (0, None, "> 0"), "seed": (0, None),
            "checkpoint_every": (1, None), "log_every": (1, None), "eval_every": (0, None),
            "eval_cells": (1, None), "eval_long_steps": (0, None),
            # The spec's fields, by their flag names.
            **{_config_name(name): rule for name, rule in cloning.CloneSpec.RANGES.items()}})
        self.spec()  # what the table cannot say (x_low < x_high)
        sizes = self.meta_test_layer_sizes
        if (len(sizes) < 2 or not all(isinstance(n, int) and not isinstance(n, bool)
                                      for n in sizes) or min(sizes) < 1):
            raise ValueError(f"--meta_test_layer_sizes={','.join(map(str, sizes))}: give "
                             "at least two positive sizes, e.g. 784,10.")

    def to_dict(self) -> dict:
        d = json.loads(json.dumps(dataclasses.asdict(self)))
        for name in LATER_FIELDS:
            if d[name] == getattr(CloneConfig, name):
                del d[name]
        return d

    def spec(self) -> cloning.CloneSpec:
        """The `vsml_jax.cloning.CloneSpec` of what is cloned."""
        return cloning.CloneSpec(**{f.name: getattr(self, _config_name(f.name))
                                    for f in dataclasses.fields(cloning.CloneSpec)})

    def vsml_config(self):
        """The VSMLConfig of the saved learner (a meta_test_layer_sizes network)."""
        if self.stage == "nearest_mean":
            return cloning.nearest_mean_config(
                list(self.meta_test_layer_sizes), hidden_size=self.hidden_size,
                msg_size=self.msg_size, micro_ticks=self.micro_ticks,
                target_scale=self.target_scale, logit_scale=self.logit_scale,
                error_scale=self.error_scale)
        return cloning.clone_config(
            list(self.meta_test_layer_sizes), hidden_size=self.hidden_size,
            msg_size=self.msg_size, micro_ticks=self.micro_ticks,
            target_scale=self.target_scale, w_init_std=self.w_init_std,
            error_scale=self.error_scale)


def _optimizer(c: CloneConfig):
    """(Adam with optional clipping and cosine decay over num_steps unless set,
    its learning-rate schedule)."""
    from vsml_jax.meta import gradient
    decay = (c.lr_decay_steps or c.num_steps) if c.lr_final_fraction != 1.0 else 0
    return (gradient.make_optimizer("adam", c.lr, clip_norm=c.clip_norm or None,
                                    decay_steps=decay,
                                    final_lr_fraction=c.lr_final_fraction),
            gradient.make_schedule(c.lr, decay, c.lr_final_fraction))


def _build(c: CloneConfig, cfg, spec, mesh):
    """(init_fn, step_fn, eval_fn) of the run; the train state is a dict (see init_fn)."""
    import jax
    import jax.numpy as jnp
    import optax
    from vsml_jax.meta.sharding import replicated, shard_batch
    from vsml_jax.params import init_params
    from vsml_jax.training import checkpointing

    opt, schedule = _optimizer(c)
    use_enc = c.learned_encoding
    start_params, start_encoding = None, None
    if c.init_checkpoint:  # read once, here, not inside the traced init_fn
        template = init_params(jax.random.PRNGKey(0), cfg)
        start_params, info = checkpointing.load_learner(c.init_checkpoint, template)
        start_params = start_params.replace(cfg=cfg)
        start_encoding = cloning.encoding_from_info(info)

    def init_fn():
        k_params, k_chains, k_run = jax.random.split(jax.random.PRNGKey(c.seed), 3)
        params = init_params(k_params, cfg) if start_params is None else start_params
        encoding = start_encoding or cloning.init_encoding(cfg)
        chains = cloning.init_chains(k_chains, cfg, spec, c.batch_size, stage=c.stage)
        train = {"params": params, "encoding": encoding}
        return {"train": train, "opt_state": opt.init(train), "chains": chains,
                "key": k_run, "step": jnp.zeros((), jnp.int32)}

    def loss_fn(train, chains, key):
        # The restarts are drawn inside the loss so that the encoding of the
        # fresh states gets its gradient.
        enc = train["encoding"] if use_enc else None
        start, batch, advanced, reset = cloning.chain_batch(
            key, cfg, spec, shard_batch(chains, mesh), c.reset_prob, c.max_drift, c.stage,
            enc)
        loss, (metrics, final) = cloning.clone_loss(train["params"], spec, batch, c.stage,
                                                    enc, start, mesh)
        metrics["chain_abs_w"] = jnp.mean(jnp.abs(batch.w0))
        metrics["chain_restarts"] = jnp.mean(reset.astype(jnp.float32))
        return loss, (metrics, advanced.replace(state=final))

    # Train state replicated on the mesh, except the K cells, split over it.
    def state_shardings():
        rep = replicated(mesh)
        shapes = jax.eval_shape(init_fn)
        out = jax.tree_util.tree_map(lambda _: rep, shapes)
        out["chains"] = jax.tree_util.tree_map(
            lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
                mesh.axis_names[0])), shapes["chains"])
        return out

    shardings = state_shardings()

    @jax.jit
    def _step(state):
        key, k_step = jax.random.split(state["key"])
        train = state["train"]
        (_, (metrics, chains)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            train, state["chains"], k_step)
        updates, opt_state = opt.update(grads, state["opt_state"], train)
        new = {"train": optax.apply_updates(train, updates), "opt_state": opt_state,
               "chains": jax.lax.stop_gradient(chains), "key": key,
               "step": state["step"] + 1}
        metrics["lr"] = schedule(state["step"])
        return jax.lax.with_sharding_constraint(new, shardings), metrics

    eval_key = jax.random.PRNGKey(c.seed + 12345)  # fixed: evals are comparable
    eval_batch = cloning.sample_batch(eval_key, spec, c.eval_cells, stage=c.stage)

    @jax.jit
    def eval_fn(state):
        train = state["train"]
        enc = train["encoding"] if use_enc else None
        _, (metrics, _) = cloning.clone_loss(train["params"], spec, eval_batch, c.stage,
                                             enc)
        out = {"eval": metrics}
        if c.stage == "backprop" and c.eval_long_steps > 0:
            out["eval_long"] = cloning.long_run_errors(
                train["params"], spec, jax.random.fold_in(eval_key, 1), c.eval_cells,
                c.eval_long_steps, enc)
        return out

    return init_fn, _step, eval_fn, shardings


def _check_memory(c: CloneConfig, step_fn, init_fn, shardings, mesh):
    """Refuses a step that cannot fit in memory (`vsml_jax.runs.memory`); the
    run's first step reuses the executable compiled here."""
    import jax
    from vsml_jax.runs import memory
    specs = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s,
                                          weak_type=getattr(x, "weak_type", False)),
        jax.eval_shape(init_fn), shardings)
    fixes = (f"a smaller --batch_size (now {c.batch_size}) or --unroll_steps (now "
             f"{c.unroll_steps})")
    return memory.check_fits(step_fn.lower(specs).compile(), mesh.local_devices, fixes)


def train_and_evaluate(c: CloneConfig, workdir: str) -> RunOutcome:
    """Clones (or resumes cloning) in `workdir`; every process calls it.

    Call `vsml_jax.runtime.start()` before. Returns a RunOutcome with the
    cloned V_M (host numpy pytree).
    """
    import jax
    from vsml_jax import runtime
    from vsml_jax.meta import sharding
    from vsml_jax.training import loop

    spec, cfg = c.spec(), c.vsml_config()
    mesh = sharding.device_mesh()
    try:
        sharding.check_divisible("--batch_size", c.batch_size, mesh)
        init_fn, step_fn, eval_fn, shardings = _build(c, cfg, spec, mesh)
    except ValueError as e:
        raise SettingsError(str(e)) from e
    # The loop builds the state replicated; the cells then move to their shards.
    init_sharded = jax.jit(init_fn, out_shardings=shardings)
    t0 = time.time()

    def export(state, step, finished=False):
        train = runtime.to_host(state["train"])
        if not runtime.is_primary():
            return
        records = loop.read_metrics(workdir)
        last = [r["loss"] for r in records if r["split"] == "train"][-100:]
        extra = {
            "clone": dataclasses.asdict(spec),
            "cloning": {
                "stage": c.stage, "steps": step, "finished": finished,
                "final_loss": float(np.mean(last)) if last else None,
                "final_loss_window": len(last),
                "seconds_this_session": round(time.time() - t0, 1),
                "conventions": cloning.conventions(c.stage, spec),
            },
            "final_eval": recent_evals(records),
            # Training-only: how to write a given (w, b) into a cell (figure 4, tests).
            "clone_encoding": cloning.encoding_to_dict(
                train["encoding"] if c.learned_encoding else None),
        }
        from vsml_jax.learners import vsml_learner
        write_portable(workdir, vsml_learner(cfg), train["params"], c.to_dict(), extra)

    logging.info("Cloning (%s stage) in %s on %s.", c.stage, workdir, where_it_runs())
    result = loop.run(workdir, init_sharded, step_fn, c.num_steps, config_dict=c.to_dict(),
                      checkpoint_every=c.checkpoint_every, log_every=c.log_every,
                      eval_fn=eval_fn, eval_every=c.eval_every,
                      safe_to_change=SAFE_TO_CHANGE, on_checkpoint=export,
                      nan_advice="lower the learning rate (it may change on resume): "
                                 f"`{rerun_command({'lr': f'{c.lr / 3:.3g}'})}`",
                      preflight=lambda: _check_memory(c, step_fn, init_fn, shardings, mesh))
    if not result.preempted:
        export(result.state, result.step, finished=True)
    return RunOutcome(params=runtime.to_host(result.state["train"]["params"]),
                      step=result.step, preempted=result.preempted)
