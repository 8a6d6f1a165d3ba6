"""Meta-training a learner from scratch (paper sec. 3.2, figure 6) as a library call.

    from vsml_jax import runtime
    from vsml_jax.runs.meta_train import MetaTrainConfig, train_and_evaluate

    runtime.start()        # first: joins a multi-process job if there is one
    result = train_and_evaluate(MetaTrainConfig(dataset="mnist", pool=4,
                                                num_steps=200), "runs/mine")

Episodes of `episode_length` examples are drawn from the training split of
`dataset` (a random label permutation per episode, optionally a random input
projection; "a,b" mixes data sets, one per episode); the meta-loss is the
online cross-entropy, minimised by BPTT with Adam/SGD (`meta_optimizer=
"adam"|"sgd"`, the batch of episodes split over all devices of all
processes) or by an evosax strategy (`"cma_es"`, `"open_es"`, ...: the
population split over the same devices).

Everything goes to the workdir (see `vsml_jax.training.loop`): config.json,
checkpoints/, metrics.jsonl and TensorBoard events, periodic meta-tests
(split "eval/<dataset>": cumulative online accuracy on test-split episodes),
and the portable learner params.msgpack + learner.json, rewritten at every
checkpoint ("finished": false until the last step) so that a stopped run
can be meta-tested too. Running it again with the same workdir resumes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Optional, Tuple

import numpy as np
from absl import logging

from vsml_jax.config import CELLS, PROTOCOLS, REDUCTIONS, VSMLConfig
from vsml_jax.runs.common import (RunOutcome, SettingsError, check_choices, check_ranges,
                                  data_fingerprint, load_checked_dataset, recent_evals,
                                  rerun_command, where_it_runs, write_portable)

GRADIENT_OPTIMIZERS = ("adam", "sgd")
# Short names of evosax strategies (evosax 0.3 class names); any evosax class
# name works too. Kept here, free of JAX, so flag checks need no backend.
STRATEGY_NAMES = {
    "cma_es": "CMA_ES", "sep_cma_es": "Sep_CMA_ES", "open_es": "Open_ES",
    "snes": "SNES", "xnes": "xNES", "pgpe": "PGPE", "simple_es": "SimpleES",
    "ars": "ARS", "ma_es": "MA_ES", "lm_ma_es": "LM_MA_ES", "cr_fm_nes": "CR_FM_NES",
    "simple_ga": "SimpleGA",
}

# VSMLConfig fields a run can set, with the defaults used when neither the
# config nor --init_checkpoint gives them. None in MetaTrainConfig = "not set",
# so a run started from a checkpoint can tell a clash from a default.
ARCH_DEFAULTS = {
    "cell": "lstm", "hidden_size": 16, "msg_size": 8, "micro_ticks": 2,
    "backward_interaction": True, "reduce": "mean", "readout_scale": 1.0,
    "readout_tanh": False, "error_scale": 1.0, "feed_label": False,
    "protocol": "delayed_error", "init_std": 0.5, "tie_layers": True,
    "coordinates": False, "dtype": "float32",
}
# Settings that may change when a run resumes (the change is recorded in
# config.json): cadences, length, where data is read, meta-tests, and the
# optimiser's learning rate, schedule and clipping.
SAFE_TO_CHANGE = ("num_steps", "checkpoint_every", "log_every", "eval_every",
                  "data_dir", "download", "eval_datasets", "eval_length",
                  "eval_episodes", "member_batch", "micro_batch", "lr", "lr_decay_steps",
                  "lr_final_fraction", "clip_norm", "es_lr", "max_to_keep", "kernel")


@dataclasses.dataclass(frozen=True)
class MetaTrainConfig:
    """Everything that defines a meta-training run (the flags of experiments.meta_train).

    Architecture fields left None take `ARCH_DEFAULTS` (or, with
    `init_checkpoint`, the checkpoint's architecture).
    """
    learner: str = "vsml"
    layer_sizes: Optional[Tuple[int, ...]] = None
    cell: Optional[str] = None
    hidden_size: Optional[int] = None
    msg_size: Optional[int] = None
    micro_ticks: Optional[int] = None
    backward_interaction: Optional[bool] = None
    reduce: Optional[str] = None
    readout_scale: Optional[float] = None
    readout_tanh: Optional[bool] = None
    error_scale: Optional[float] = None
    feed_label: Optional[bool] = None
    protocol: Optional[str] = None
    state_clip: float = 4.0
    init_std: Optional[float] = None
    tie_layers: Optional[bool] = None
    coordinates: Optional[bool] = None
    param_init_scale: float = 1.0
    dtype: Optional[str] = None
    # Data
    dataset: str = "mnist"
    pool: int = 1
    data_dir: Optional[str] = None
    download: bool = False
    synthetic_size: int = 1000
    episode_length: int = 100
    batch_size: int = 4
    permute_labels: bool = True
    random_projection: bool = False
    min_classes: int = 0
    pixel_permute_prob: float = 0.0
    min_length: int = 0
    # Meta-optimisation
    meta_optimizer: str = "adam"
    lr: float = 1e-2
    lr_decay_steps: int = 0
    lr_final_fraction: float = 0.1
    clip_norm: float = 1.0
    popsize: int = 16
    sigma_init: float = 0.1
    es_lr: float = 0.01
    member_batch: str = "auto"
    micro_batch: int = 0
    num_steps: int = 1000
    remat: bool = True
    remat_chunk: Tuple[int, ...] = ()
    # "xla" (vsml_jax.grid) or "pallas" (vsml_jax.pallas_grid: the LSTM micro
    # ticks as one Pallas kernel each way; opt-in, for TPU/GPU; the training
    # step only, see build_learner).
    kernel: str = "xla"
    init_checkpoint: Optional[str] = None
    seed: int = 0
    # Bookkeeping
    checkpoint_every: int = 100
    max_to_keep: int = 3
    log_every: int = 10
    eval_every: int = 0
    eval_datasets: Tuple[str, ...] = ("mnist", "fashion_mnist")
    eval_length: int = 1000
    eval_episodes: int = 2

    def __post_init__(self):
        check_ranges(self, {
            "hidden_size": (1, None), "msg_size": (1, None), "micro_ticks": (1, None),
            "readout_scale": (0, None, "> 0"), "init_std": (0, None),
            "param_init_scale": (0, None, "> 0"), "synthetic_size": (1, None),
            "episode_length": (1, None), "batch_size": (1, None), "lr": (0, None, "> 0"),
            "min_classes": (0, None), "pixel_permute_prob": (0, 1),
            "min_length": (0, None),
            "lr_decay_steps": (0, None), "lr_final_fraction": (0, 1),
            "clip_norm": (0, None), "popsize": (2, None), "sigma_init": (0, None, "> 0"),
            "es_lr": (0, None, "> 0"), "num_steps": (0, None),
            "checkpoint_every": (1, None), "max_to_keep": (1, None),
            "log_every": (1, None),
            "eval_every": (0, None), "eval_length": (1, None), "eval_episodes": (1, None),
            "seed": (0, None), "state_clip": (None, None)})
        check_choices(self, {"learner": ("vsml", "meta_rnn"), "cell": CELLS,
                             "reduce": REDUCTIONS, "protocol": PROTOCOLS, "pool": (1, 2, 4),
                             "dtype": ("float32", "bfloat16", "float16", "float64"),
                             "kernel": ("xla", "pallas")})
        if not (self.meta_optimizer in GRADIENT_OPTIMIZERS
                or self.meta_optimizer in STRATEGY_NAMES
                or self.meta_optimizer in STRATEGY_NAMES.values()
                or self.meta_optimizer[:1].isupper()):  # another evosax class name
            raise ValueError(
                f"--meta_optimizer={self.meta_optimizer!r}: use adam, sgd or an "
                f"evolution strategy ({', '.join(STRATEGY_NAMES)}, or an evosax class "
                "name such as CMA_ES).")
        if self.micro_batch and (self.micro_batch < 0 or self.batch_size % self.micro_batch
                                 or self.meta_optimizer not in GRADIENT_OPTIMIZERS):
            raise ValueError(
                f"--micro_batch={self.micro_batch}: gradient accumulation (adam/sgd) in "
                f"groups that divide --batch_size={self.batch_size}, or 0 (the whole "
                "batch); evolution strategies use --member_batch instead.")
        if self.member_batch not in ("auto", "all") and not (
                self.member_batch.isdigit() and int(self.member_batch) >= 1):
            raise ValueError(f"--member_batch={self.member_batch!r}: use auto, all or a "
                             "positive integer.")
        if any(k < 1 for k in self.remat_chunk) or (
                self.episode_length % math.prod(self.remat_chunk or (1,))):
            raise ValueError(
                f"--remat_chunk={','.join(map(str, self.remat_chunk))}: use 0, or "
                "positive integers whose product divides --episode_length="
                f"{self.episode_length} (e.g. 10 or 10,10).")
        if self.min_length > self.episode_length:
            raise ValueError(f"--min_length={self.min_length} exceeds --episode_length="
                             f"{self.episode_length}: use 0 (off) or at most "
                             f"{self.episode_length}.")
        if self.min_length and not self.gradient_based:
            raise ValueError(f"--min_length={self.min_length} weights the BPTT meta-loss; "
                             f"--meta_optimizer={self.meta_optimizer} does not use it: "
                             "set --min_length=0.")
        if self.eval_every and not self.eval_datasets:
            raise ValueError(f"--eval_every={self.eval_every} needs meta-test data sets: "
                             "give --eval_datasets (e.g. mnist), or --eval_every=0.")
        if self.meta_optimizer == "open_es" and self.popsize % 2:
            raise ValueError(f"--popsize={self.popsize}: open_es samples antithetic pairs, "
                             f"so the population must be even (e.g. {self.popsize + 1}; on "
                             "several devices also a multiple of their number).")

    @property
    def gradient_based(self) -> bool:
        return self.meta_optimizer in GRADIENT_OPTIMIZERS

    def arch(self, name: str):
        """An architecture field, or its default when not set."""
        value = getattr(self, name)
        return ARCH_DEFAULTS[name] if value is None else value

    def to_dict(self) -> dict:
        """JSON-ready fields (config.json, learner.json)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ------------------------------------------------------------- building
def load_train_data(cfg: MetaTrainConfig):
    """The meta-training Dataset (training split, or synthetic)."""
    from vsml_jax import data as vdata
    import jax
    if cfg.dataset == "synthetic":
        return vdata.synthetic_dataset(jax.random.PRNGKey(cfg.seed + 1),
                                       cfg.synthetic_size, (28 // cfg.pool) ** 2)
    return load_checked_dataset(cfg.dataset, "train", cfg.data_dir, cfg.pool, cfg.download)


def vsml_config(cfg: MetaTrainConfig, input_size: int, num_classes: int) -> VSMLConfig:
    """The VSMLConfig of a run from scratch: layer sizes follow the data."""
    if cfg.layer_sizes:
        sizes = tuple(cfg.layer_sizes)
        if sizes[0] != input_size or sizes[-1] != num_classes:
            raise ValueError(
                f"--layer_sizes={','.join(map(str, sizes))} must start with the input "
                f"size {input_size} (dataset {cfg.dataset}, --pool={cfg.pool}) and end "
                f"with the {num_classes} classes, e.g. "
                f"--layer_sizes={input_size},{num_classes}.")
    else:
        sizes = (input_size, num_classes)
    a = cfg.arch
    return VSMLConfig(
        layer_sizes=sizes, cell=a("cell"), hidden_size=a("hidden_size"),
        msg_size=a("msg_size"), micro_ticks=a("micro_ticks"),
        backward_interaction=a("backward_interaction"), reduce=a("reduce"),
        readout_scale=a("readout_scale"), readout_tanh=a("readout_tanh"),
        error_scale=a("error_scale"), feed_label=a("feed_label"), protocol=a("protocol"),
        state_clip=cfg.state_clip if cfg.state_clip > 0 else None,
        init_std=a("init_std"), tie_layers=a("tie_layers"), coordinates=a("coordinates"),
        param_init_scale=cfg.param_init_scale, dtype=a("dtype"))


def load_init_checkpoint(cfg: MetaTrainConfig, input_size: int, num_classes: int):
    """cfg.init_checkpoint (a workdir or pretrained:NAME) loaded once, or None.

    Raises ValueError if it is unreadable, holds another kind of learner, or
    an architecture setting that was given disagrees with it: the stored meta
    variables only make sense in the architecture they were trained in.
    """
    if not cfg.init_checkpoint:
        return None
    from vsml_jax import pretrained
    try:
        # The layer sizes follow the data (VS-ML); other learners must fit it.
        loaded = pretrained.load_learner(cfg.init_checkpoint, input_size=input_size,
                                         num_classes=num_classes)
    except pretrained.LearnerFileError as e:
        raise ValueError(f"--init_checkpoint: {e}") from e
    if loaded.learner.name != cfg.learner:
        raise ValueError(f"--init_checkpoint={cfg.init_checkpoint} holds a "
                         f"{loaded.learner.name} learner, not --learner={cfg.learner}.")
    stored = loaded.learner.config
    vsml = isinstance(stored, VSMLConfig)
    names = ARCH_DEFAULTS if vsml else ("hidden_size",)
    clashes = [f"--{n}={getattr(cfg, n)} (checkpoint: {getattr(stored, n)})"
               for n in names
               if getattr(cfg, n) is not None and getattr(cfg, n) != getattr(stored, n)]
    if vsml and cfg.layer_sizes and tuple(cfg.layer_sizes) != stored.layer_sizes:
        clashes.append(f"--layer_sizes={','.join(map(str, cfg.layer_sizes))} (checkpoint "
                       f"with this input size: {','.join(map(str, stored.layer_sizes))})")
    if clashes:
        raise ValueError(
            "the architecture comes from --init_checkpoint, but these settings disagree "
            f"with it: {'; '.join(clashes)}. Drop them (or start from scratch).")
    logging.info("Starting from the %s learner in %s.", loaded.learner.name,
                 cfg.init_checkpoint)
    return loaded


def build_learner(cfg: MetaTrainConfig, input_size: int, num_classes: int,
                  train: bool = True, init=None):
    """The learner of the run (remat only for the training unroll).

    The architecture comes from `init` (the loaded init_checkpoint) if given.
    """
    from vsml_jax.learners import vsml_learner
    if cfg.learner == "meta_rnn":
        if init is not None:
            return init.learner
        from vsml_jax.baselines.meta_rnn import meta_rnn_learner
        return meta_rnn_learner(input_size, num_classes, cfg.arch("hidden_size"))
    arch = init.learner.config if init is not None else vsml_config(cfg, input_size,
                                                                    num_classes)
    kwargs = {}
    if train and cfg.remat_chunk:
        kwargs["remat_chunk"] = tuple(cfg.remat_chunk)
    elif train and cfg.remat:
        kwargs["remat"] = True
    if train and cfg.kernel == "pallas":
        # The training step runs per device (shard_map), where the Pallas kernels
        # may go; the meta-tests are plain replicated jits, which cannot
        # partition a Mosaic kernel, so they keep the XLA kernels.
        kwargs["impl"] = "pallas"
    return vsml_learner(arch, **kwargs)


def make_eval_fn(cfg: MetaTrainConfig, learner, params_of, mesh, input_size: int,
                 num_classes: int):
    """state -> {"eval/<dataset>": cumulative accuracies} on the test splits.

    Every eval data set is resized to the learner's `input_size` and must have
    its `num_classes` classes.
    """
    import jax
    from vsml_jax import runtime
    from vsml_jax.meta.objective import meta_test_accuracy
    from vsml_jax.meta.sharding import replicated
    tests = {name: runtime.put_replicated(
                 load_checked_dataset(name, "test", cfg.data_dir, cfg.pool, cfg.download,
                                      input_size=input_size, num_classes=num_classes),
                 replicated(mesh))
             for name in cfg.eval_datasets}
    key = jax.random.PRNGKey(cfg.seed + 12345)  # fixed: evals are comparable
    length, episodes = cfg.eval_length, cfg.eval_episodes

    @jax.jit
    def evaluate(params, test):
        return meta_test_accuracy(learner, params, key, test, length, episodes)

    def eval_fn(state):
        params = params_of(state)
        return {f"eval/{name}": evaluate(params, test) for name, test in tests.items()}
    return eval_fn


# ------------------------------------------------------------------ run
def train_and_evaluate(cfg: MetaTrainConfig, workdir: str, *,
                       restore_step: Optional[int] = None,
                       allow_data_change: bool = False) -> RunOutcome:
    """Meta-trains (or resumes) the run `cfg` in `workdir`; every process calls it.

    Call `vsml_jax.runtime.start()` before (it joins a multi-process job).
    `restore_step`: resume from this kept checkpoint (0: from scratch), newer
    ones moved aside; `allow_data_change`: resume on training data that differ
    from the checkpoint's (see `vsml_jax.training.loop`).
    Returns a RunOutcome: the final meta variables (host numpy pytree), the
    steps done, and whether SIGTERM stopped the run early.
    Raises ValueError for settings that do not fit the data or devices.
    """
    try:
        built = _build(cfg)
    except ValueError as e:  # a setting that does not fit the data or devices
        raise SettingsError(str(e)) from e
    return _train(cfg, workdir, built, restore_step, allow_data_change)


def check_memory(cfg: MetaTrainConfig, b: "_Built"):
    """Refuses a training step that cannot fit in memory (see `vsml_jax.runs.memory`).

    Compiles the step now; the run's first step reuses this executable.
    Returns the estimated bytes (None: no estimate on this backend).
    """
    from vsml_jax.runs import memory
    if cfg.gradient_based:
        fixes = (f"--remat_chunk={memory.remat_chunk_hint(cfg.episode_length)} (store "
                 "the carries of chunks only, recompute the rest), --micro_batch=N "
                 f"(N dividing --batch_size={cfg.batch_size}: accumulate the gradient over "
                 "groups of N episodes), or a smaller --batch_size or --episode_length")
    else:
        fixes = ("--member_batch=1 (evaluate the members one after another), or a "
                 "smaller --popsize, --batch_size or --episode_length")
    compiled = memory.compile_program(b.step_fn, b.init_fn)
    return memory.check_fits(compiled, b.mesh.local_devices, fixes)


@dataclasses.dataclass
class _Built:
    """The pieces of a run that `_build` makes from its config."""
    mesh: Any
    learner: Any
    init_fn: Any
    step_fn: Any
    eval_fn: Any
    params_of: Any   # train state -> the learner's meta variables
    nan_advice: Any  # restore step -> text
    input_info: dict
    data_fingerprint: dict


def _build(cfg: MetaTrainConfig) -> _Built:
    import jax
    from vsml_jax.meta import sharding
    from vsml_jax.meta.objective import EpisodeSpec

    mesh = sharding.device_mesh()
    train_data = load_train_data(cfg)
    num_classes, input_size = train_data.num_classes, train_data.input_dim
    init = load_init_checkpoint(cfg, input_size, num_classes)
    learner = build_learner(cfg, input_size, num_classes, train=True, init=init)
    spec = EpisodeSpec(length=cfg.episode_length, batch=cfg.batch_size,
                       permute_labels=cfg.permute_labels,
                       random_projection=cfg.random_projection,
                       min_classes=cfg.min_classes,
                       pixel_permute_prob=cfg.pixel_permute_prob,
                       min_length=cfg.min_length)
    init_params = init.params if init is not None else None

    if cfg.gradient_based:
        from vsml_jax.meta import gradient
        optimizer = gradient.make_optimizer(
            cfg.meta_optimizer, cfg.lr, cfg.clip_norm or None,
            decay_steps=cfg.lr_decay_steps, final_lr_fraction=cfg.lr_final_fraction)
        init_fn = gradient.make_init_fn(learner, optimizer, cfg.seed, init_params)
        schedule = gradient.make_schedule(cfg.lr, cfg.lr_decay_steps, cfg.lr_final_fraction)
        step_fn = gradient.make_step_fn(learner, optimizer, train_data, spec, mesh,
                                        schedule, micro_batch=cfg.micro_batch)
        params_of = lambda state: state.params
        # A rate that blew the weights up at once is far too large: a third of
        # it would too, so never suggest more than 1e-3.
        changes = {"lr": f"{min(cfg.lr / 3, 1e-3):.3g}",
                   **({} if cfg.clip_norm else {"clip_norm": 1})}
        advice = lambda restore: (
            "lower the learning rate" + ("" if cfg.clip_norm else " and clip the gradient")
            + " (these settings may change on resume): "
            f"`{rerun_command({**changes, 'restore_step': restore})}`")
    else:
        from vsml_jax.meta import evolution
        strategy, es_params = evolution.make_strategy(
            cfg.meta_optimizer, cfg.popsize, learner.init_params(jax.random.PRNGKey(0)),
            cfg.sigma_init, cfg.es_lr)
        init_fn = evolution.make_init_fn(learner, strategy, es_params, cfg.seed,
                                         init_params)
        member_batch = {"auto": "auto", "all": None}.get(cfg.member_batch)
        member_batch = member_batch if cfg.member_batch in ("auto", "all") else int(
            cfg.member_batch)
        step_fn = evolution.make_step_fn(learner, strategy, es_params, train_data, spec,
                                         mesh, member_batch)
        params_of = lambda state: evolution.mean_params(strategy, state, learner)
        es_lr = f"{cfg.es_lr / 3:.3g}"
        advice = (
            (lambda restore: "lower the step size: "
             f"`{rerun_command({'es_lr': es_lr, 'restore_step': restore})}`")
            if cfg.meta_optimizer == "open_es" else
            (lambda restore: "the search diverged; start again in a new --workdir with "
             f"a smaller --sigma_init (e.g. {cfg.sigma_init / 3:.3g})"))

    eval_fn = None
    if cfg.eval_every:
        eval_learner = build_learner(cfg, input_size, num_classes, train=False, init=init)
        eval_fn = make_eval_fn(cfg, eval_learner, params_of, mesh, input_size, num_classes)
    input_info = {"dataset": cfg.dataset, "pool": cfg.pool, "input_size": input_size,
                  "num_classes": num_classes}
    return _Built(mesh, learner, init_fn, step_fn, eval_fn, params_of, advice, input_info,
                  data_fingerprint(train_data))


def _train(cfg: MetaTrainConfig, workdir: str, b: _Built, restore_step=None,
           allow_data_change=False) -> RunOutcome:
    import jax
    from vsml_jax import runtime
    from vsml_jax.training import loop

    t0 = time.time()

    def export(state, step, finished=False):
        params = runtime.to_host(b.params_of(state))  # every process computes it
        if not runtime.is_primary():
            return
        records = loop.read_metrics(workdir)
        last = [r["loss"] for r in records if r["split"] == "train"][-50:]
        write_portable(workdir, b.learner, params, cfg.to_dict(), {
            "input": b.input_info,
            "meta_training": {
                "steps": step, "finished": finished,
                "meta_optimizer": cfg.meta_optimizer,
                "final_meta_loss": float(np.mean(last)) if last else None,
                "final_meta_loss_window": len(last),
                "seconds_this_session": round(time.time() - t0, 1),
            },
            "final_eval": recent_evals(records)})

    logging.info("Meta-training %s (%s) in %s on %s.", b.learner.name,
                 cfg.meta_optimizer, workdir, where_it_runs())
    result = loop.run(workdir, b.init_fn, b.step_fn, cfg.num_steps,
                      config_dict=cfg.to_dict(), checkpoint_every=cfg.checkpoint_every,
                      log_every=cfg.log_every, eval_fn=b.eval_fn,
                      eval_every=cfg.eval_every, safe_to_change=SAFE_TO_CHANGE,
                      mesh=b.mesh, on_checkpoint=export, nan_advice=b.nan_advice,
                      max_to_keep=cfg.max_to_keep, restore_step=restore_step,
                      checkpoint_meta={"data": b.data_fingerprint},
                      allow_data_change=allow_data_change,
                      preflight=lambda: check_memory(cfg, b))
    if not result.preempted:
        export(result.state, result.step, finished=True)
        if runtime.is_primary():
            logging.info("Wrote %s/params.msgpack and %s/learner.json", workdir, workdir)
    return RunOutcome(params=runtime.to_host(b.params_of(result.state)), step=result.step,
                      preempted=result.preempted)
