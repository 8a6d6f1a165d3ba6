"""Meta-testing learners on online streams of test data (paper fig. 6, and fig. 5
mode) as a library call.

    from vsml_jax import runtime
    from vsml_jax.runs.evaluate import EvaluateConfig, meta_test

    runtime.start()
    summary = meta_test(EvaluateConfig(checkpoint="pretrained:mnist", datasets=("mnist",),
                                       baselines=("adam", "nearest_mean")), "runs/eval")

Every method sees the same streams: for each seed, N examples of `split` in
random order (no label permutation), pooled to the learner's input size (the
`pool` it was trained with, or `pool`, or `input_size`; a VS-ML learner runs
at any input size).

`datasets` takes any data set spec (`vsml_jax.data.specs`): mnist,
fashion_mnist, idx:DIR, npz:FILE, tfds:NAME, and mixtures joined by "+"
(("mnist+fashion_mnist", "npz:letters.npz") is two entries, the first a
mixture whose streams come from one of its data sets per seed). Colour images
are made grey and every image is resized to the input size
(`vsml_jax.data.normalize`). Each learner is built for each data set's number
of classes: a VS-ML learner meta-trained on 10 classes runs on 5 or 26, and
the baselines follow the data; a learner whose meta variables depend on the
class count (the Meta RNN) is refused with the reason. The learning rates of
the online-backprop baselines are chosen per dataset by a sweep on streams of
the *training* split with separate seeds, and the sweep table is reported (a
single entry in `lrs`, or `tanh_sgd_lr`, fixes the rate with no sweep). With
`stream_batch=K` every step feeds K examples: K copies of a VS-ML learner with
averaged states, a minibatch of K for Adam/SGD (T x K examples per stream,
drawn with replacement beyond the split's size).

With `shuffle_pixels=S` every image's pixels are shuffled by one fixed
permutation: a learner that does not use where a pixel is (VS-ML without
coordinates, nearest mean / neighbour) scores the same as without.

Held-out test curves: with `test_every=M` every learner also classifies the
first `test_examples` images of `test_split` after step 0 and every M steps
(learning nothing from them); the streams then come from the training split
(unless `split` is set). `tanh_sgd_lr="clone"` with `tanh_sgd_init_scale=0`
and a cloned-backprop checkpoint gives the comparison of fig. 5.

`meta_test` writes, on process 0 only, OUT_DIR/summary.json (metrics
mean/std/per-seed, settings, sweep tables, parameter counts, configs,
held-out curves, and under "data" the folder / file each data set was read
from), OUT_DIR/curves.npz (per-seed curves), OUT_DIR/fig6.png (cumulative
online accuracy vs examples seen, one panel per dataset),
OUT_DIR/window_accuracy.png (accuracy over the last `window` steps) and, with
`test_every`, OUT_DIR/test_accuracy.png (held-out accuracy vs examples seen),
and prints a table. The computations run on every process.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from vsml_jax.baselines import nonparametric
from vsml_jax.runs.common import SettingsError, check_choices, check_ranges

GD_KINDS = ("adam", "sgd", "tanh_sgd")
NONPARAMETRIC_KINDS = nonparametric.METHODS
CHECKPOINT_KINDS = ("meta_rnn", "hebbian", "vsml")
SPLITS = ("train", "test")
PANEL_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
# 1-nearest neighbour keeps every example of every seed's stream in memory.
NEAREST_NEIGHBOUR_MAX_BYTES = 8 * 2**30


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Everything that defines a meta-test (the flags of experiments.evaluate).

    `split` None is the flag's default: "test", or with `test_every` > 0 the
    split other than `test_split` (the streams never contain the held-out
    images). `pool` -1 takes the pooling `checkpoint` was trained with.
    `tanh_sgd_lr` is "" (sweep `lrs`), a number, or "clone".
    """
    checkpoint: Optional[str] = None
    label: Optional[str] = None
    datasets: Tuple[str, ...] = ("mnist", "fashion_mnist")
    data_dir: Optional[str] = None
    download: bool = False
    baselines: Tuple[str, ...] = ("adam",)
    episode_length: int = 1000
    seeds: int = 10
    seed_offset: int = 0
    split: Optional[str] = None
    pool: int = -1
    input_size: int = 0
    shuffle_pixels: int = -1
    stream_batch: int = 0
    lrs: Tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
    sweep_seeds: int = 3
    sweep_seed_offset: int = 1_000_000
    sweep_split: str = "train"
    sweep_length: int = 0
    tanh_sgd_lr: str = ""
    tanh_sgd_init_scale: float = 1.0
    test_every: int = 0
    test_examples: int = 1000
    test_split: str = "test"
    gd_hidden: Tuple[int, ...] = ()
    checkpoints: Tuple[int, ...] = (100, 500, 1000, 2000)
    window: int = 100
    chunk_size: int = 1000

    def __post_init__(self):
        check_choices(self, {"split": SPLITS, "sweep_split": SPLITS, "test_split": SPLITS})
        check_ranges(self, {
            "episode_length": (1, None), "seeds": (1, None), "seed_offset": (0, None),
            "pool": (-1, None), "input_size": (0, None), "shuffle_pixels": (-1, None),
            "stream_batch": (0, None), "sweep_seeds": (1, None),
            "sweep_seed_offset": (0, None), "sweep_length": (0, None),
            "tanh_sgd_init_scale": (0, None), "test_every": (0, None),
            "test_examples": (1, None), "window": (1, None), "chunk_size": (1, None)})
        if self.pool == 0:
            raise ValueError("--pool=0: give a pooling factor (1, 2 or 4) or -1 (the "
                             "--checkpoint's).")
        _check_ints("checkpoints", self.checkpoints, "step counts >= 1, e.g. 100,500")
        _check_ints("gd_hidden", self.gd_hidden, "layer sizes >= 1, e.g. 100 or 100,50")
        check_dataset_specs(self.datasets)
        baselines = parse_baselines(self.baselines)
        if not self.checkpoint and not baselines:
            raise ValueError("nothing to evaluate: give --checkpoint and/or --baselines.")
        if (self.seed_offset < self.sweep_seed_offset + self.sweep_seeds
                and self.sweep_seed_offset < self.seed_offset + self.seeds):
            raise ValueError("the sweep seeds overlap the reported seeds; move "
                             "--sweep_seed_offset past --seed_offset + --seeds.")
        if self.pool > 0 or self.input_size:  # else the checkpoint's pool (meta_test)
            resolve_input_size(self.input_size, self.pool)
        tanh_fixed = self.tanh_sgd_lr.strip() != ""
        if tanh_fixed:
            fixed_tanh_sgd_lr(self, None, check_only=True)
        for lr in self.lrs:
            if (isinstance(lr, bool) or not isinstance(lr, numbers.Real)
                    or not math.isfinite(lr) or lr < 0):
                raise ValueError(f"--lrs={','.join(map(str, self.lrs))}: give learning "
                                 "rates as finite numbers >= 0.")
        if not self.lrs and any(k in ("adam", "sgd") or (k == "tanh_sgd" and not tanh_fixed)
                                for _, k, _ in baselines):
            raise ValueError("--lrs is empty; give the learning rate(s) of the "
                             "online-backprop baselines.")
        if self.test_every and self.split == self.test_split:
            raise ValueError(
                f"--split={self.split} and --test_split={self.test_split}: the streams "
                "would contain the held-out images; draw the streams from another split "
                "(e.g. --split=train) or leave --split unset.")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def stream_split(self) -> str:
        """The split the streams come from: with held-out tests never the test split."""
        if self.split is not None:
            return self.split
        if self.test_every:
            return "train" if self.test_split != "train" else "test"
        return "test"


def _check_ints(name: str, values: Sequence[Any], want: str) -> None:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"--{name}={','.join(map(str, values))}: give {want}.")


def parse_baselines(specs: Sequence[str], taken: Tuple[str, ...] = ()
                    ) -> List[Tuple[str, str, str]]:
    """[(method label, kind, path or "")] from the `baselines` entries.

    An entry is KIND or KIND:PATH, optionally prefixed by "LABEL=" (the name in
    tables and plots). Labels are unique, also against `taken` (the
    --checkpoint learner's label): a second "vsml" becomes "vsml_2".
    SettingsError for an entry that is not understood.
    """
    out, labels = [], set(taken)
    for spec in specs:
        name, _, rest = spec.rpartition("=")
        kind, _, path = rest.partition(":")
        if not ((kind in GD_KINDS + NONPARAMETRIC_KINDS and not path)
                or (kind in CHECKPOINT_KINDS and path)):
            raise SettingsError(
                f"--baselines entry {spec!r} is not understood; use "
                f"{', '.join(GD_KINDS + NONPARAMETRIC_KINDS)} "
                f"or KIND:PATH with KIND in {', '.join(CHECKPOINT_KINDS)} (e.g. "
                "meta_rnn:/path/to/meta_train/workdir), optionally as LABEL=KIND[:PATH].")
        if name and name in labels:
            raise SettingsError(f"--baselines: the label {name!r} is used twice.")
        label, n = name or kind, 2
        while label in labels:
            label, n = f"{kind}_{n}", n + 1
        labels.add(label)
        out.append((label, kind, path))
    return out


def check_memory_of_nearest_neighbour(baselines, seeds: int, examples: int,
                                      input_size: int) -> None:
    """SettingsError if the nearest_neighbour baseline's memories would not fit."""
    if not any(kind == "nearest_neighbour" for _, kind, _ in baselines):
        return
    size = seeds * examples * input_size * 4
    if size > NEAREST_NEIGHBOUR_MAX_BYTES:
        raise SettingsError(
            f"the nearest_neighbour baseline would hold {seeds} seeds x {examples:,} "
            f"examples x {input_size} float32 inputs = {size / 2**30:.1f} GiB; use fewer "
            "--seeds, a shorter --episode_length or a larger --pool, or drop it from "
            "--baselines.")


def check_dataset_specs(datasets: Sequence[str]) -> None:
    """SettingsError for a `datasets` entry that is no data set spec."""
    from vsml_jax.data import split_spec
    if not datasets:
        raise SettingsError("--datasets is empty; name at least one data set.")
    for spec in datasets:
        try:
            split_spec(spec)
        except ValueError as e:
            raise SettingsError(f"--datasets: {e}") from e


def resolve_pool(config: EvaluateConfig, main) -> int:
    """The pooling factor: `pool`, else the checkpoint's (-1 when `input_size` decides)."""
    if config.pool > 0:
        return config.pool
    if config.input_size:
        return -1  # unused: input_size decides
    if main is None:
        raise SettingsError("--pool (1, 2 or 4) or --input_size is needed when no "
                            "--checkpoint is given.")
    if main.pool is None:
        raise SettingsError(f"cannot tell which pooling {main.source} was trained with "
                            "(no flags.pool in learner.json); pass --pool.")
    return main.pool


def resolve_input_size(input_size: int, pool: int) -> int:
    """D: `input_size`, else (28 // pool)^2; SettingsError if not a valid size."""
    from vsml_jax.data import target_side
    try:
        side = target_side(input_size or None, pool)
    except ValueError as e:
        raise SettingsError(f"--input_size / --pool: {e}") from e
    return side * side


def load_checkpoint(spec: str, input_size: Optional[int], kind: str = "",
                    num_classes: Optional[int] = None):
    """`vsml_jax.pretrained.load_learner` (LearnerFileError if it cannot be
    read or built), SettingsError if it holds another kind of learner."""
    from vsml_jax.pretrained import load_learner
    loaded = load_learner(spec, input_size=input_size, num_classes=num_classes)
    if kind and loaded.learner.name != kind:
        raise SettingsError(f"{spec} holds a {loaded.learner.name!r} learner, not "
                            f"{kind!r}; use --baselines={loaded.learner.name}:{spec}.")
    return loaded


def fixed_tanh_sgd_lr(config: EvaluateConfig, main, check_only: bool = False
                      ) -> Optional[float]:
    """tanh_sgd's learning rate from `tanh_sgd_lr` (None: sweep `lrs`).

    With check_only, "clone" is only checked to have a checkpoint to read.
    """
    spec = config.tanh_sgd_lr.strip()
    if not spec:
        return None
    if spec == "clone":
        if not config.checkpoint:
            raise SettingsError("--tanh_sgd_lr=clone needs a cloned learner as "
                                "--checkpoint (e.g. pretrained:backprop_clone).")
        if check_only:
            return None
        from vsml_jax import evaluation
        lr = evaluation.clone_learning_rate(main.info, main.learner.config)
        if not np.isfinite(lr):
            raise SettingsError(f"--tanh_sgd_lr=clone: {main.source} is not a cloned "
                                "learner (its learner.json has no \"clone\": {\"lr\"}); "
                                "pass the rate as a number.")
        return lr
    try:
        lr = float(spec)
    except ValueError:
        raise SettingsError(f"--tanh_sgd_lr={spec!r}: give a number, 'clone' or nothing "
                            "(sweep --lrs).") from None
    if not (lr >= 0 and math.isfinite(lr)):
        raise SettingsError(f"--tanh_sgd_lr={spec}: must be a finite number >= 0.")
    return lr


def check_runs_on_streams(label: str, learner, stream_batch: int, test_every: int) -> None:
    """SettingsError if `learner` cannot take K examples per step or held-out tests."""
    from vsml_jax.config import VSMLConfig
    cfg = learner.config
    if stream_batch and not (isinstance(cfg, VSMLConfig)
                             or getattr(cfg, "native_minibatch", False)):
        raise SettingsError(f"{label}: a {learner.name!r} learner does not define "
                            f"batch-averaged streams; drop --stream_batch={stream_batch} "
                            "or evaluate it in a separate run.")
    if test_every and learner.predict is None:
        raise SettingsError(f"{label}: a {learner.name!r} learner defines no `predict`, so "
                            f"held-out accuracy cannot be measured; drop "
                            f"--test_every={test_every} or evaluate it in a separate run.")


def gd_factory(config: EvaluateConfig, kind: str, input_size: int, num_classes: int):
    """lr -> Learner for an online-backprop baseline."""
    from vsml_jax.baselines import online_gd
    hidden = tuple(int(h) for h in config.gd_hidden)
    if kind == "tanh_sgd":
        return lambda lr: online_gd.tanh_linear_learner(
            input_size, num_classes, learning_rate=lr, init_scale=config.tanh_sgd_init_scale)
    return lambda lr: online_gd.online_gd_learner(input_size, num_classes, optimizer=kind,
                                                  learning_rate=lr, hidden_sizes=hidden,
                                                  name=kind)


def load_data(config: EvaluateConfig, dataset: str, split: str, pool: int, input_size: int):
    """A split at the learners' input size, with its pixels shuffled if
    `shuffle_pixels` asks for it (the same permutation for every split and
    data set of the same size)."""
    from vsml_jax.data import make_dataset
    data = make_dataset(dataset, split, data_dir=config.data_dir, pool=max(pool, 1),
                        download=config.download, input_size=input_size)
    if config.shuffle_pixels < 0:
        return data
    perm = np.random.default_rng(config.shuffle_pixels).permutation(data.input_dim)
    return dataclasses.replace(data, images=data.images[:, perm])


def held_out_data(config: EvaluateConfig, dataset: str, pool: int, input_size: int):
    """((images [N, D], labels [N]), the Dataset they come from): the first
    `test_examples` of `test_split`."""
    from vsml_jax import evaluation
    data = load_data(config, dataset, config.test_split, pool, input_size)
    try:
        return evaluation.held_out_set(data, config.test_examples), data
    except ValueError as e:
        raise SettingsError(f"{dataset} {config.test_split}: {e}") from e


def format_table(dataset: str, results: Dict[str, Dict[str, Any]]) -> str:
    """The printed table of one data set: mean +- std of every metric per method."""
    # test_acc@n for every tested step would make the table too wide; the
    # JSON has them all, the table the final one.
    keys = [k for k in next(iter(results.values()))["metrics"]
            if not k.startswith("test_acc@")]
    w = max([12] + [len(m) + 1 for m in results])
    lines = [f"== {dataset}: mean +- std over seeds",
             f"{'method':<{w}}" + "".join(f"{k:>20}" for k in keys)]
    for method, res in results.items():
        cells = "".join(f"{res['metrics'][k]['mean']:>12.4f} +-{res['metrics'][k]['std']:6.4f}"
                        for k in keys)
        lines.append(f"{method:<{w}}{cells}")
    return "\n".join(lines)


def meta_test(config: EvaluateConfig, out_dir: str) -> Dict[str, Any]:
    """Meta-tests the checkpoint and baselines of `config`; every process calls it.

    Call `vsml_jax.runtime.start()` before. Process 0 writes the files into
    `out_dir` (see the module doc) and prints progress and tables; every
    process returns the summary (the content of summary.json).

    Raises:
      SettingsError: settings that do not fit the learners or data (e.g. a
        held-out split with another class count, a memory that would not fit).
      LearnerFileError: a learner that cannot be read or cannot run on a data
        set's input size or class count.
      DatasetNotFoundError, DatasetFormatError, DownloadError, IDXError: data.
    """
    from vsml_jax import evaluation, plotting, runtime
    from vsml_jax.baselines import nonparametric as nonparam

    c = config
    t_start = time.perf_counter()
    primary = runtime.is_primary()

    def log(msg: str) -> None:
        if primary:
            print(msg, flush=True)

    N, K = c.episode_length, c.stream_batch
    seeds = list(range(c.seed_offset, c.seed_offset + c.seeds))
    sweep_seeds = list(range(c.sweep_seed_offset, c.sweep_seed_offset + c.sweep_seeds))
    checkpoints = [int(n) for n in c.checkpoints]
    lrs = [float(x) for x in c.lrs]
    probe = load_checkpoint(c.checkpoint, None) if c.checkpoint else None
    main_label = (c.label or probe.learner.name) if probe else None
    baselines = parse_baselines(c.baselines, (main_label,) if probe else ())

    pool = resolve_pool(c, probe)
    input_size = resolve_input_size(c.input_size, pool)
    split = c.stream_split()
    test_every = c.test_every
    if test_every and c.split is None:
        log(f"--test_every={test_every}: streams come from the {split} split, "
            f"held-out images from the {c.test_split} split (set --split to choose).")
    tanh_sgd_lr = fixed_tanh_sgd_lr(c, probe)
    examples_per_stream = N * max(K, 1)
    check_memory_of_nearest_neighbour(baselines, len(seeds), examples_per_stream, input_size)

    # Every data set's stream split, then every learner with meta variables at
    # the streams' input size and each data set's class count (loaded once per
    # class count: every Learner object compiles its own programs). All before
    # the first run, so a learner that cannot take a data set fails at once.
    stream_data = {dataset: load_data(c, dataset, split, pool, input_size)
                   for dataset in c.datasets}
    checkpoints_to_load = ([(main_label, c.checkpoint, "")] if probe is not None else [])
    checkpoints_to_load += [(label, path, kind) for label, kind, path in baselines if path]
    by_classes: Dict[Tuple[str, int], Any] = {}
    for data in stream_data.values():
        for label, path, kind in checkpoints_to_load:
            key = (label, data.num_classes)
            if key not in by_classes:
                by_classes[key] = load_checkpoint(path, input_size, kind, data.num_classes)
                check_runs_on_streams(label, by_classes[key].learner, K, test_every)

    if primary:
        os.makedirs(out_dir, exist_ok=True)
    results: Dict[str, Dict[str, Any]] = {}
    data_info: Dict[str, Dict[str, Any]] = {}
    curves: Dict[str, np.ndarray] = {}
    cum_panels, win_panels, test_panels = {}, {}, {}
    for dataset in c.datasets:
        data = stream_data[dataset]
        num_classes = data.num_classes
        log(f"--- {dataset} ({data.source}; {split} split, {num_classes} classes, "
            f"{input_size} inputs, N={N}, {len(seeds)} seeds"
            f"{f', {K} examples per step' if K else ''}"
            + (f", held-out test every {test_every} steps on {c.test_examples} "
               f"{c.test_split} images" if test_every else "") + ")")
        data_info[dataset] = {"num_classes": num_classes, "input_size": input_size,
                              "stream": evaluation.describe_dataset(data)}
        streams = evaluation.make_streams(data, seeds, N, stream_batch=K)
        eval_kwargs = dict(stream_batch=K, checkpoints=checkpoints, window=c.window,
                           chunk_size=c.chunk_size, log=log)
        if test_every:
            held_out, held_out_set = held_out_data(c, dataset, pool, input_size)
            if held_out_set.num_classes != num_classes:
                raise SettingsError(
                    f"{dataset}: the {split} split has {num_classes} classes but the "
                    f"{c.test_split} split {held_out_set.num_classes}; both splits "
                    "must label the same classes.")
            eval_kwargs.update(held_out=held_out, held_out_every=test_every)
            data_info[dataset]["held_out"] = evaluation.describe_dataset(held_out_set)
        learners = {label: by_classes[(label, num_classes)]
                    for label, _, _ in checkpoints_to_load}
        per_method: Dict[str, Dict[str, Any]] = {}

        def record(method, learner, params, extra):
            res = evaluation.evaluate_method(learner, params, streams, seeds, **eval_kwargs)
            per_method[method] = dict(
                metrics=res.summary, counts=evaluation.count_variables(learner, params),
                config=evaluation.config_dict(learner.config), **extra)
            curves[f"{dataset}/{method}/cum_acc"] = res.cum_acc.astype(np.float32)
            curves[f"{dataset}/{method}/win_acc"] = res.win_acc.astype(np.float32)
            log(f"{method}: cumulative accuracy after {N} steps "
                f"{res.summary[f'cum_acc@{N}']['mean']:.4f} +- "
                f"{res.summary[f'cum_acc@{N}']['std']:.4f}")
            if res.test_acc is not None:
                per_method[method]["held_out"] = {
                    "steps": res.test_steps.tolist(),
                    "examples_seen": (res.test_steps * max(K, 1)).tolist(),
                    "acc_mean": res.test_acc.mean(axis=0).tolist(),
                    "acc_std": res.test_acc.std(axis=0).tolist()}
                curves[f"{dataset}/{method}/test_acc"] = res.test_acc.astype(np.float32)
                curves[f"{dataset}/{method}/test_steps"] = res.test_steps
                final = res.summary["test_acc_final"]
                log(f"{method}: held-out accuracy after {N} steps {final['mean']:.4f} +- "
                    f"{final['std']:.4f}")

        for name, loaded in learners.items():
            record(name, loaded.learner, loaded.params,
                   {"source": loaded.source, "trained_flags": loaded.info.get("flags", {})})

        for label, kind, path in baselines:
            if kind in NONPARAMETRIC_KINDS:
                learner = nonparam.nonparametric_learner(
                    input_size, num_classes, method=kind, memory_size=examples_per_stream)
                record(label, learner, None, {"source": "non-parametric"})
        gd = [(label, kind) for label, kind, path in baselines if kind in GD_KINDS]
        swept = [k for _, k in gd if not (k == "tanh_sgd" and tanh_sgd_lr is not None)]
        if swept and len(lrs) > 1:
            sweep_data = load_data(c, dataset, c.sweep_split, pool, input_size)
            data_info[dataset]["sweep"] = evaluation.describe_dataset(sweep_data)
            sweep_streams = evaluation.make_streams(
                sweep_data, sweep_seeds, c.sweep_length or N, stream_batch=K)
        for label, kind in gd:
            make = gd_factory(c, kind, input_size, num_classes)
            if kind == "tanh_sgd" and tanh_sgd_lr is not None:
                best, table, how = tanh_sgd_lr, None, f"--tanh_sgd_lr={c.tanh_sgd_lr}"
            elif len(lrs) == 1:  # nothing to choose: no sweep runs
                best, table, how = lrs[0], None, "--lrs (one entry)"
            else:
                best, table = evaluation.sweep_learning_rate(make, lrs, sweep_streams,
                                                            sweep_seeds, stream_batch=K)
                how = f"sweep on {c.sweep_split} streams"
                log(f"{label}: lr {how} "
                    + ", ".join(f"{r['lr']:g}: {r['score']:.3f}" for r in table)
                    + f" -> lr={best:g}")
                if best in (min(lrs), max(lrs)):
                    log(f"note: {label}'s best learning rate {best:g} is at the edge of "
                        "--lrs; the optimum may lie outside the grid.")
            if table is None:
                log(f"{label}: lr={best:g} from {how}")
            learner = make(best)
            record(label, learner, None, {"lr": best, "lr_sweep": table, "lr_source": how,
                                          "source": "online backprop"})
        results[dataset] = per_method
        title = PANEL_TITLES.get(dataset, dataset)
        cum_panels[title] = {m: plotting.mean_std(curves[f"{dataset}/{m}/cum_acc"])
                             for m in per_method}
        win_panels[title] = {m: plotting.mean_std(curves[f"{dataset}/{m}/win_acc"])
                             for m in per_method}
        if test_every:
            test_panels[title] = {m: (curves[f"{dataset}/{m}/test_steps"],
                                      curves[f"{dataset}/{m}/test_acc"]) for m in per_method}

    files = {"figure": "fig6.png", "window_figure": "window_accuracy.png",
             "curves": "curves.npz"}
    if test_every:
        files["test_figure"] = "test_accuracy.png"
    summary = {
        "settings": {
            "checkpoint": c.checkpoint, "baselines": list(c.baselines),
            "datasets": list(c.datasets), "split": split, "episode_length": N,
            "seeds": seeds, "pool": pool if pool > 0 else None, "input_size": input_size,
            "stream_batch": K, "data_dir": c.data_dir, "download": c.download,
            "checkpoints": checkpoints, "window": c.window, "std": "over seeds, ddof=0",
            "shuffle_pixels": c.shuffle_pixels,
            "lr_sweep": {"lrs": lrs, "seeds": sweep_seeds, "split": c.sweep_split,
                         "length": c.sweep_length or N,
                         "criterion": "mean cumulative online accuracy over the stream"},
            "gd_hidden": [int(h) for h in c.gd_hidden],
            "tanh_sgd": {"lr_flag": c.tanh_sgd_lr, "fixed_lr": tanh_sgd_lr,
                         "init_scale": c.tanh_sgd_init_scale},
            # The held-out images are the first `examples` of `split`.
            "held_out": ({"every": test_every, "examples": c.test_examples,
                          "split": c.test_split} if test_every else None),
        },
        "results": results,
        # Per data set: what was read (folder / file / tfds set) for each role.
        "data": data_info,
        "files": files,
    }
    if not primary:
        return summary

    xlabel = "examples seen" if not K else f"examples seen ({K} per step)"
    side = math.isqrt(input_size)
    title = (f"{len(seeds)} seeds (mean +- std), {side}x{side} inputs, "
             f"{split} split streams")
    plotting.plot_learning_curves(cum_panels, os.path.join(out_dir, files["figure"]),
                                  xlabel=xlabel, x_scale=max(K, 1),
                                  ylabel="cumulative online accuracy", title=title)
    plotting.plot_learning_curves(win_panels, os.path.join(out_dir, files["window_figure"]),
                                  xlabel=xlabel, x_scale=max(K, 1),
                                  ylabel=f"accuracy over last {c.window} steps",
                                  title=title)
    if test_every:
        plotting.plot_held_out_curves(test_panels, os.path.join(out_dir,
                                                                files["test_figure"]),
                                      xlabel=xlabel, x_scale=max(K, 1), title=title)
    np.savez_compressed(os.path.join(out_dir, files["curves"]), **curves)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for dataset, per_method in results.items():
        print(format_table(dataset, per_method))
    counts = next(iter(results.values()))
    print("parameters: " + "; ".join(
        f"{m}: {r['counts']['meta_variables']:,} meta / {r['counts']['learned_variables']:,} "
        "learned" for m, r in counts.items()))
    log(f"wrote {out_dir}/summary.json, " + ", ".join(files.values())
        + f" in {time.perf_counter() - t_start:.1f} s")
    return summary
