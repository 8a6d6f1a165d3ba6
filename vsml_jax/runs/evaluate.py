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
from), OUT_DIR/curves.npz (per-seed curves) and the figures, named after the
learner and the data sets (`figure_stem`, e.g.
pretrained_mnist_on_mnist_fashion_mnist): STEM.png (cumulative online
accuracy vs examples seen, one panel per dataset), STEM_window_accuracy.png
(accuracy over the last `window` steps) and, with `test_every`,
STEM_test_accuracy.png (held-out accuracy vs examples seen); summary.json's
"files" lists them. It prints a table. The `checkpoint` learner is named in
tables and plots by `label`, else by `checkpoint_label` (pretrained:NAME, or
a workdir's folder name). The computations run on every process.

Three modules: this one loads learners and data and runs the meta-test;
`evaluate_settings` holds `EvaluateConfig` and the checks of its settings,
`evaluate_report` the names, tables and files written (`write_report`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np

from vsml_jax.runs.common import SettingsError
# The settings and the report live in their own modules; their names are
# re-exported here, where callers have always found them.
from vsml_jax.runs.evaluate_report import (  # noqa: F401
    PANEL_TITLES, checkpoint_label, dataset_label, figure_files, figure_stem, format_table,
    write_report)
from vsml_jax.runs.evaluate_settings import (  # noqa: F401
    CHECKPOINT_KINDS, GD_KINDS, NEAREST_NEIGHBOUR_MAX_BYTES, NONPARAMETRIC_KINDS, SPLITS,
    EvaluateConfig, check_dataset_specs, check_example_memories,
    check_runs_on_streams, check_stream_length, fixed_tanh_sgd_lr, parse_baselines,
    resolve_input_size, resolve_pool)


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
    from vsml_jax import data as vdata
    try:
        data = vdata.make_dataset(dataset, split, data_dir=config.data_dir,
                                  pool=max(pool, 1), download=config.download,
                                  input_size=input_size)
    except (vdata.DatasetNotFoundError, vdata.DatasetFormatError, vdata.DownloadError,
            vdata.IDXError):
        raise
    except ValueError as e:  # bad values (NaN pixels, 0..255 floats): one line, as
        raise SettingsError(str(e)) from e  # meta_train and demo report them
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


def snapshot_learner(spec: Optional[str], folder: str) -> Tuple[Optional[str], Optional[int]]:
    """(path to read the learner from, its meta-training step or None).

    A workdir's learner is rewritten at every checkpoint while its run is
    live; it is copied once into `folder` (learner.json read before and after
    params.msgpack must agree), so every data set is measured with one step.
    Anything else (pretrained:NAME, a prefix) is returned as it is.
    """
    if not spec or not os.path.isdir(spec):
        return spec, None
    info_path, params_path = (os.path.join(spec, "learner.json"),
                              os.path.join(spec, "params.msgpack"))
    if not (os.path.exists(info_path) and os.path.exists(params_path)):
        return spec, None
    for _ in range(20):
        with open(info_path, "rb") as f:
            before = f.read()
        with open(params_path, "rb") as f:
            params = f.read()
        with open(info_path, "rb") as f:
            after = f.read()
        if before == after:
            break
        time.sleep(0.2)
    copy = os.path.join(folder, f"learner{len(os.listdir(folder))}")
    os.makedirs(copy)
    with open(os.path.join(copy, "learner.json"), "wb") as f:
        f.write(after)
    with open(os.path.join(copy, "params.msgpack"), "wb") as f:
        f.write(params)
    try:
        info = json.loads(after)
        # meta_train writes "meta_training", clone "cloning" ("clone" is its spec).
        step = (info.get("meta_training") or info.get("cloning") or {}).get("steps")
    except (ValueError, AttributeError):
        step = None
    return copy, step if isinstance(step, int) else None


def meta_test(config: EvaluateConfig, out_dir: str) -> Dict[str, Any]:
    """Meta-tests the checkpoint and baselines of `config`; every process calls it.

    `out_dir` is locked while written (a second run into it is refused) and
    must not hold a summary.json yet. A workdir given as checkpoint is read
    once (`snapshot_learner`); summary.json records the step it measured.

    Call `vsml_jax.runtime.start()` before. Process 0 writes the files into
    `out_dir` (see the module doc) and prints progress and tables; every
    process returns the summary (the content of summary.json).

    Raises:
      SettingsError: settings that do not fit the learners or data (e.g. a
        held-out split with another class count, a memory that would not fit).
      LearnerFileError: a learner that cannot be read or cannot run on a data
        set's input size or class count.
      DatasetNotFoundError, DatasetFormatError, DownloadError, IDXError: data.
      WorkdirLockedError, OutDirTakenError: out_dir is in use or holds results.
    """
    import tempfile
    from vsml_jax import runtime
    from vsml_jax.runs.common import claim_out_dir
    lock = claim_out_dir(out_dir, "summary.json") if runtime.is_primary() else None
    try:
        with tempfile.TemporaryDirectory(prefix="vsml_eval_") as tmp:
            checkpoint, step = snapshot_learner(config.checkpoint, tmp)
            copies = {checkpoint: config.checkpoint}
            baselines = []
            for spec in config.baselines:  # [LABEL=]KIND:PATH entries read once too
                name, eq, rest = spec.rpartition("=")
                kind, colon, path = rest.partition(":")
                if colon and os.path.isdir(path):
                    copy = snapshot_learner(path, tmp)[0]
                    copies[copy] = path
                    spec = f"{name}{eq}{kind}:{copy}"
                baselines.append(spec)
            shown = {"checkpoint": config.checkpoint, "checkpoint_step": step,
                     "baselines": list(config.baselines)}
            c = dataclasses.replace(config, checkpoint=checkpoint,
                                    baselines=tuple(baselines))
            try:
                return _meta_test(c, out_dir, shown)
            except ValueError as e:  # name the user's folder, not the read-once copy
                message = str(e)
                for copy, path in copies.items():
                    if copy and path and copy != path:
                        message = message.replace(copy, path.rstrip("/"))
                if message == str(e):
                    raise
                raise type(e)(message) from e
    finally:
        if lock is not None:
            lock.release()


def _meta_test(config: EvaluateConfig, out_dir: str, shown: Dict[str, Any]
               ) -> Dict[str, Any]:
    from vsml_jax import evaluation, runtime
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
    main_label = (c.label or checkpoint_label(shown["checkpoint"])) if probe else None
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
    check_example_memories(baselines, len(seeds), examples_per_stream, input_size)

    # Every data set's stream split, then every learner with meta variables at
    # the streams' input size and each data set's class count (loaded once per
    # class count: every Learner object compiles its own programs). All before
    # the first run, so a learner that cannot take a data set fails at once.
    stream_data = {dataset: load_data(c, dataset, split, pool, input_size)
                   for dataset in c.datasets}
    for dataset, data in stream_data.items():
        check_stream_length(dataset, data, split, N, K, c.with_replacement, log)
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
                    input_size, num_classes, method=kind, memory_size=examples_per_stream,
                    bandwidth=c.parzen_bandwidth)
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

    files = figure_files(main_label, c.datasets, held_out=bool(test_every))
    summary = {
        "settings": {
            "checkpoint": c.checkpoint, "baselines": list(c.baselines),
            "datasets": list(c.datasets), "split": split, "episode_length": N,
            "seeds": seeds, "pool": pool if pool > 0 else None, "input_size": input_size,
            "stream_batch": K, "data_dir": c.data_dir, "download": c.download,
            "checkpoints": checkpoints, "window": c.window, "std": "over seeds, ddof=0",
            "shuffle_pixels": c.shuffle_pixels,
            # A stream longer than its split repeats examples only when asked.
            "with_replacement": c.with_replacement,
            "lr_sweep": {"lrs": lrs, "seeds": sweep_seeds, "split": c.sweep_split,
                         "length": c.sweep_length or N,
                         "criterion": "mean cumulative online accuracy over the stream"},
            "gd_hidden": [int(h) for h in c.gd_hidden],
            "parzen_bandwidth": c.parzen_bandwidth,
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
    # What was given (not the read-once copies), and the step it held.
    summary["settings"].update(shown)
    if primary:
        write_report(out_dir, summary, curves, t_start)
    return summary
