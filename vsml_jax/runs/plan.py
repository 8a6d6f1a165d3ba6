"""Plan a run before you rent it: compile its programs for an accelerator that is not here.

    from vsml_jax.runs.meta_train import MetaTrainConfig
    from vsml_jax.runs.plan import plan
    report = plan(MetaTrainConfig(dataset="mnist", episode_length=200, batch_size=256,
                                  remat_chunk=(20,)), "tpu-v5e-32")
    print(report.text())

Each program of the run is built with the builders a real run uses, lowered
over the target's devices without the hardware (`vsml_jax.accelerators`:
a `Mesh` over abstract TPU/GPU devices, inputs as `jax.ShapeDtypeStruct`s
with their shardings) and compiled by the target's own compiler:

- "bptt_step": one meta-training step with a gradient optimiser, or
  "es_generation": one evolution-strategy generation (population sharded);
- "clone_step": one cloning step (for a CloneConfig);
- "meta_test": the meta-test unroll a meta-training run evaluates with.

For each it reports (`ProgramReport`): whether it fits (per-device
arguments + outputs + temporaries + code vs the chip's memory, and the
margin), the while loops with their trip counts and kernels (`hlo_stats`),
the collectives (kind, count, bytes, how many inside a loop), FLOPs and bytes
where the compiler reports them, and the step-time lower bound
(`hlo_stats.LOWER_BOUND_FORMULA`). `fit=True` searches the memory-saving
settings for programs that do not fit and reports what it chose.

Call it in a process whose JAX backend has not started, or one on the CPU:
it sets `JAX_PLATFORMS=cpu` and the plugin variables itself.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from vsml_jax import accelerators, hlo_stats
from vsml_jax.runs.common import SettingsError

GiB = 1 << 30


class DoesNotFitError(SettingsError):
    """A program needs more memory than the target's chips have (the message says what would fit)."""


@dataclasses.dataclass
class ProgramReport:
    """What the compiler says about one program of the run on the target."""
    name: str
    fits: bool
    device_memory_bytes: int
    device_capacity_bytes: int
    memory: Dict[str, int]
    loops: List[Dict[str, Any]]
    collectives: Dict[str, Any]
    flops: Optional[float]
    bytes_accessed: Optional[float]
    step_time_lower_bound_s: Optional[float]
    settings: Dict[str, Any]
    chosen: Optional[str] = None
    error: Optional[str] = None
    hlo: Optional[str] = dataclasses.field(default=None, repr=False)

    @property
    def kernels_per_time_step(self) -> List[int]:
        """Kernels of each while body (one number per loop, in the HLO's order)."""
        return [l["kernels"] for l in self.loops]

    @property
    def collectives_in_loops(self) -> int:
        return int(self.collectives.get("in_loops", 0))

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("hlo")
        d["margin_bytes"] = self.device_capacity_bytes - self.device_memory_bytes
        d["kernels_per_time_step"] = self.kernels_per_time_step
        d["collectives_in_loops"] = self.collectives_in_loops
        return d

    def lines(self) -> List[str]:
        gb = lambda b: f"{b / GiB:.3g} GiB"
        if self.error and not self.memory:
            return [f"{self.name}: {self.error}"]
        m = self.memory
        head = (f"{self.name}: {'fits' if self.fits else 'DOES NOT FIT'} — "
                f"{gb(self.device_memory_bytes)} of {gb(self.device_capacity_bytes)} per "
                f"device (margin {gb(self.device_capacity_bytes - self.device_memory_bytes)}; "
                f"arguments {gb(m['arguments'])}, outputs {gb(m['outputs'])}, temporaries "
                f"{gb(m['temporaries'])}, code {gb(m['generated_code'])})")
        out = [head, "  settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items())]
        if self.chosen:
            out.append(f"  --fit chose: {self.chosen}")
        if self.error:
            out.append(f"  {self.error}")
        if self.loops:
            per = ", ".join(f"{l['kernels']} (x{l['trip_count'] or '?'})" for l in self.loops)
            out.append(f"  while loops: {len(self.loops)}; kernels per body (trip count): "
                       f"{per}; sum {sum(self.kernels_per_time_step)}")
        else:
            out.append("  while loops: none")
        c = self.collectives
        kinds = ", ".join(f"{k} x{v['count']} ({v['bytes']} B, {v['in_loops']} in loops)"
                          for k, v in c.get("by_kind", {}).items()) or "none"
        out.append(f"  collectives: {c.get('count', 0)} ({c.get('in_loops', 0)} inside a "
                   f"loop): {kinds}")
        if self.flops is not None:
            out.append(f"  cost analysis: {self.flops:.3g} FLOPs, {self.bytes_accessed:.3g} "
                       f"bytes accessed per device (loop bodies counted once); step time "
                       f">= {self.step_time_lower_bound_s * 1e3:.3g} ms")
        else:
            out.append("  cost analysis: not reported by this compiler (no lower bound)")
        return out


@dataclasses.dataclass
class PlanReport:
    """The report of `plan`: the target and one ProgramReport per program."""
    target: str
    target_description: str
    programs: List[ProgramReport]
    config: Dict[str, Any]

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.programs)

    def to_dict(self) -> Dict[str, Any]:
        return {"target": self.target, "target_description": self.target_description,
                "fits": self.fits, "lower_bound_formula": hlo_stats.LOWER_BOUND_FORMULA,
                "programs": [p.to_dict() for p in self.programs], "config": self.config}

    def text(self) -> str:
        out = [f"Plan for {self.target_description}"]
        for p in self.programs:
            out += p.lines()
        out.append(f"Lower bound: {hlo_stats.LOWER_BOUND_FORMULA}. Deviceless compilation "
                   "tells memory, program shape and this bound, not the real step time.")
        return "\n".join(out)

    def dump_hlo(self, folder: str) -> List[str]:
        """Writes FOLDER/<program>.hlo.txt (optimised HLO) per program; returns the paths."""
        os.makedirs(folder, exist_ok=True)
        paths = []
        for p in self.programs:
            if p.hlo is not None:
                path = os.path.join(folder, f"{p.name}.hlo.txt")
                with open(path, "w") as f:
                    f.write(p.hlo)
                paths.append(path)
        return paths


# ------------------------------------------------------------ compiling
def _spec(tree, sharding):
    import jax
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _report(name: str, lowered_fn: Callable[[], Any], target: accelerators.Target,
            settings: Dict[str, Any]) -> ProgramReport:
    """Compiles `lowered_fn()` and reads what the compiler says about it."""
    chip = target.chip
    try:
        compiled = lowered_fn().compile()
    except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory is an XlaRuntimeError
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
            raise
        needed = _needed_from_message(msg)
        return ProgramReport(name, False, needed or 0, target.capacity_bytes, {}, [], {},
                             None, None, None, settings,
                             error="the compiler ran out of device memory: "
                                   + msg.strip().splitlines()[0][:300])
    text = compiled.as_text()
    mem = hlo_stats.memory(compiled, target.capacity_bytes)
    costs = hlo_stats.cost(compiled)
    loops = [dataclasses.asdict(l) for l in hlo_stats.while_loops(text)]
    return ProgramReport(
        name=name, fits=mem.fits, device_memory_bytes=mem.needed,
        device_capacity_bytes=mem.capacity,
        memory={"arguments": mem.arguments, "outputs": mem.outputs,
                "temporaries": mem.temporaries, "generated_code": mem.generated_code,
                "aliased": mem.aliased},
        loops=loops, collectives=hlo_stats.summarize_collectives(hlo_stats.collectives(text)),
        flops=None if costs is None else costs["flops"],
        bytes_accessed=None if costs is None else costs["bytes_accessed"],
        step_time_lower_bound_s=hlo_stats.step_time_lower_bound(
            costs, chip.peak_flops, chip.hbm_bandwidth),
        settings=settings, hlo=text)


def _needed_from_message(msg: str) -> Optional[int]:
    """Bytes the TPU compiler says a program needs, from its RESOURCE_EXHAUSTED text."""
    import re
    m = re.search(r"[Uu]sed ([\d.]+)([KMG])B? of", msg)
    if not m:
        return None
    return int(float(m.group(1)) * {"K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


# ------------------------------------------------------------ programs
@dataclasses.dataclass
class _Program:
    """One program of a run, not compiled yet: `lower()` gives its jax.stages.Lowered."""
    name: str
    lower: Callable[[], Any]
    settings: Dict[str, Any]


def _meta_train_programs(cfg, mesh, data, wanted) -> List[_Program]:
    """The programs of a meta-training run (those named in `wanted`), built with
    the run's own builders; `data` is its training Dataset (host arrays)."""
    import jax
    from vsml_jax.meta import gradient, evolution
    from vsml_jax.meta.objective import EpisodeSpec, meta_test_accuracy
    from vsml_jax.meta.sharding import replicated, check_divisible
    from vsml_jax.runs import meta_train as mt

    input_size, num_classes = data.input_dim, data.num_classes
    init = mt.load_init_checkpoint(cfg, input_size, num_classes)
    learner = mt.build_learner(cfg, input_size, num_classes, train=True, init=init)
    spec = EpisodeSpec(length=cfg.episode_length, batch=cfg.batch_size,
                       permute_labels=cfg.permute_labels,
                       random_projection=cfg.random_projection,
                       min_classes=cfg.min_classes,
                       pixel_permute_prob=cfg.pixel_permute_prob)
    init_params = init.params if init is not None else None
    rep = replicated(mesh)
    out = []
    settings = _settings(cfg)
    if cfg.gradient_based and "bptt_step" in wanted:
        check_divisible("--batch_size", cfg.batch_size, mesh)
        optimizer = gradient.make_optimizer(cfg.meta_optimizer, cfg.lr, cfg.clip_norm or None,
                                            decay_steps=cfg.lr_decay_steps,
                                            final_lr_fraction=cfg.lr_final_fraction)
        init_fn = gradient.make_init_fn(learner, optimizer, cfg.seed, init_params)
        step = gradient.make_step(learner, optimizer, data, spec, mesh,
                                  micro_batch=cfg.micro_batch)
        state = _spec(jax.eval_shape(init_fn), rep)
        out.append(_Program("bptt_step", lambda: step.jitted.lower(
            state, _spec(step.data, step.data_sharding())), settings))
    elif not cfg.gradient_based and "es_generation" in wanted:
        strategy, es_params = evolution.make_strategy(
            cfg.meta_optimizer, cfg.popsize, learner.init_params(jax.random.PRNGKey(0)),
            cfg.sigma_init, cfg.es_lr)
        init_fn = evolution.make_init_fn(learner, strategy, es_params, cfg.seed, init_params)
        member_batch = (None if cfg.member_batch == "all" else "auto"
                        if cfg.member_batch == "auto" else int(cfg.member_batch))
        step = evolution.make_step(learner, strategy, es_params, data, spec, mesh,
                                   member_batch)
        state = _spec(jax.eval_shape(init_fn), rep)
        out.append(_Program("es_generation", lambda: step.jitted.lower(
            state, _spec(step.data, step.data_sharding())), settings))

    if "meta_test" in wanted:
        # The meta-test unroll of the run's evaluations (replicated on every device).
        eval_learner = mt.build_learner(cfg, input_size, num_classes, train=False,
                                        init=init)
        key = jax.random.PRNGKey(0)
        length, episodes = cfg.eval_length, cfg.eval_episodes
        test = mt.load_checked_dataset(cfg.eval_datasets[0], "test", cfg.data_dir,
                                       cfg.pool, cfg.download, input_size=input_size,
                                       num_classes=num_classes)
        params = _spec(jax.eval_shape(lambda: learner.init_params(key)), rep)

        @jax.jit
        def evaluate(params, test):
            return meta_test_accuracy(eval_learner, params, key, test, length, episodes)

        out.append(_Program("meta_test", lambda: evaluate.lower(params, _spec(test, rep)),
                            {"eval_length": length, "eval_episodes": episodes,
                             "dtype": settings.get("dtype")}))
    return out


def _clone_programs(c, mesh, wanted) -> List[_Program]:
    import jax
    from vsml_jax.meta import sharding
    from vsml_jax.runs import clone
    if "clone_step" not in wanted:
        return []
    sharding.check_divisible("--batch_size", c.batch_size, mesh)
    spec, cfg = c.spec(), c.vsml_config()
    init_fn, step, _, shardings = clone._build(c, cfg, spec, mesh)
    state = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(init_fn), shardings)
    return [_Program("clone_step", lambda: step.lower(state), _settings(c))]


# ------------------------------------------------------------ fitting
def _ladders(cfg, num_devices: int) -> List[Tuple[str, List[Tuple[str, Any]]]]:
    """Memory-saving variants of a meta-training config, as ladders to search.

    Each ladder is (what it varies, [(flag, config)] from the least to the
    most memory-saving); memory falls along a ladder, so the largest setting
    that fits is found by bisection. First the micro-batch (BPTT:
    --micro_batch, episodes over all devices; ES: --member_batch, members per
    device), then, with the smallest micro-batch, coarser or finer remat chunks.
    """
    ladders = []
    if cfg.gradient_based:
        b, n = cfg.batch_size, num_devices
        now = cfg.micro_batch or b
        sizes = [m for m in range(b, 0, -1) if b % m == 0 and m % n == 0 and m < now]
        if sizes:
            ladders.append(("micro_batch", [(f"--micro_batch={m}",
                                             dataclasses.replace(cfg, micro_batch=m))
                                            for m in sizes]))
        smallest = dataclasses.replace(cfg, micro_batch=sizes[-1]) if sizes else cfg
        T = cfg.episode_length
        chunks = [k for k in (50, 25, 20, 10, 5) if T % k == 0 and k < T
                  and (k,) != tuple(cfg.remat_chunk)]
        for k in chunks:
            desc = (f"--micro_batch={smallest.micro_batch} " if sizes else "") + \
                f"--remat_chunk={k}"
            ladders.append((f"remat_chunk={k}", [(desc, dataclasses.replace(
                smallest, remat_chunk=(k,)))]))
    else:
        per_device = cfg.popsize // num_devices
        now = (per_device if cfg.member_batch in ("auto", "all")
               else int(cfg.member_batch))
        sizes = [m for m in range(per_device, 0, -1) if per_device % m == 0 and m < now]
        if sizes:
            ladders.append(("member_batch", [(f"--member_batch={m}", dataclasses.replace(
                cfg, member_batch=str(m))) for m in sizes]))
    return ladders


def _fit(config, train: ProgramReport, compile_train, log) -> ProgramReport:
    """The largest memory-saving setting whose training program fits (bisection
    on each ladder of `_ladders`); `train` is the report of `config` itself."""
    tried = 0
    for what, ladder in _ladders(config, compile_train.num_devices):
        # ladder[i] saves more memory as i grows; find the smallest i that fits.
        lo, hi, best = 0, len(ladder) - 1, None
        last = ladder[-1]
        report = compile_train(last[1])
        tried += 1
        log(f"--fit: {last[0]} {'fits' if report.fits else 'does not fit'}")
        if not report.fits:
            continue
        best, hi = (last[0], report), len(ladder) - 2
        while lo <= hi:
            mid = (lo + hi) // 2
            desc, candidate = ladder[mid]
            r = compile_train(candidate)
            tried += 1
            log(f"--fit: {desc} {'fits' if r.fits else 'does not fit'}")
            if r.fits:
                best, hi = (desc, r), mid - 1
            else:
                lo = mid + 1
        desc, report = best
        before = (f"as given it needs {train.device_memory_bytes / GiB:.3g} GiB; "
                  if train.device_memory_bytes else "")
        report.chosen = (f"{desc} ({before}the largest {what} that fits; {tried} "
                         f"compiles)" if len(ladder) > 1 else
                         f"{desc} ({before}{tried} compiles)")
        return report
    train.chosen = f"nothing that was tried fits ({tried} compiles)"
    return train


# ------------------------------------------------------------------ API
def _settings(cfg) -> Dict[str, Any]:
    keys = ("batch_size", "episode_length", "dtype", "remat", "remat_chunk", "micro_batch",
            "kernel", "popsize", "member_batch", "meta_optimizer", "stage", "hidden_size")
    out = {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}
    if hasattr(cfg, "arch"):  # MetaTrainConfig: None means the architecture default
        out.update(dtype=cfg.arch("dtype"), hidden_size=cfg.arch("hidden_size"))
        if cfg.gradient_based:
            for k in ("popsize", "member_batch"):
                out.pop(k, None)
        else:
            for k in ("remat", "remat_chunk", "micro_batch"):
                out.pop(k, None)
    return out


ALL_PROGRAMS = ("bptt_step", "es_generation", "clone_step", "meta_test")


def plan(config, target: Union[str, accelerators.Target], *, fit: bool = False,
         programs: Optional[Sequence[str]] = None,
         log: Optional[Callable[[str], None]] = None) -> PlanReport:
    """Compiles the run `config` (MetaTrainConfig or CloneConfig) for `target`.

    Args:
      config: the run's config, as experiments.meta_train / clone build it.
      target: a target name ("tpu-v5e-32", "gpu-h200x8", ...) or Target.
      fit: if the training program does not fit, search the memory-saving
        settings: the largest `--micro_batch` (BPTT) or `--member_batch` (ES)
        that fits, by bisection; if none does, other `--remat_chunk`s with the
        smallest micro-batch. The report says what it chose
        (`ProgramReport.chosen`) and holds the program compiled with it.
      programs: compile only these programs (names in ALL_PROGRAMS; default:
        all of the run).
      log: called with a line of progress per compile (e.g. print).
    Returns:
      a PlanReport.
    Raises:
      accelerators.UnknownTargetError, accelerators.PluginMissingError,
      SettingsError (e.g. a batch that does not split over the devices).
    """
    if isinstance(target, str):
        target = accelerators.get(target)
    wanted = set(ALL_PROGRAMS if programs is None else programs)
    unknown = wanted - set(ALL_PROGRAMS)
    if unknown:
        raise SettingsError(f"unknown program(s) {sorted(unknown)}; use {ALL_PROGRAMS}.")
    log = log or (lambda line: None)
    devices = accelerators.abstract_devices(target)
    from vsml_jax.meta import sharding
    from vsml_jax.runs.clone import CloneConfig
    mesh = sharding.device_mesh(devices)
    clone_run = isinstance(config, CloneConfig)
    data = None
    if not clone_run:
        from vsml_jax.runs.meta_train import load_train_data
        data = load_train_data(config)  # host arrays, read once for every compile

    def build(cfg, names):
        try:
            if clone_run:
                return _clone_programs(cfg, mesh, names)
            return _meta_train_programs(cfg, mesh, data, names)
        except ValueError as e:
            if isinstance(e, SettingsError):
                raise
            raise SettingsError(str(e)) from e

    def compile_program(p: _Program) -> ProgramReport:
        log(f"compiling {p.name} for {target.name} ({p.settings})")
        return _report(p.name, p.lower, target, p.settings)

    reports = [compile_program(p) for p in build(config, wanted)]
    if fit and not clone_run and reports and reports[0].name in ("bptt_step",
                                                                 "es_generation"):
        if not reports[0].fits:
            def compile_train(cfg):
                return compile_program(build(cfg, {reports[0].name})[0])
            compile_train.num_devices = target.num_devices
            reports[0] = _fit(config, reports[0], compile_train, log)
        else:
            reports[0].chosen = "nothing: the run's own settings fit"
    return PlanReport(target.name, target.describe(), reports,
                      _jsonable(dataclasses.asdict(config)))


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))


def not_fitting_message(report: PlanReport) -> Optional[str]:
    """One line per program that does not fit: needed vs available and what would fit."""
    lines = []
    for p in report.programs:
        if p.fits:
            continue
        need = (f"needs {p.device_memory_bytes / GiB:.3g} GiB of the "
                if p.device_memory_bytes else "needs more than the ")
        if p.chosen and p.chosen.startswith("nothing that was tried"):
            advice = ("--fit found no --micro_batch / --member_batch / --remat_chunk that "
                      "fits; use a target with more chips or a smaller --batch_size")
        elif p.name in ("bptt_step", "es_generation"):
            advice = ("run with --fit: it finds the largest --micro_batch (ES: "
                      "--member_batch) that fits, or a --remat_chunk; or use a target "
                      "with more chips")
        else:
            advice = "use a target with more memory per chip"
        lines.append(f"{p.name} does not fit {report.target}: it {need}"
                     f"{p.device_capacity_bytes / GiB:.3g} GiB per device; {advice}.")
    return "\n".join(lines) or None
