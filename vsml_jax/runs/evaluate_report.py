"""What a meta-test writes and prints (`vsml_jax.runs.evaluate`): names of
learners and figures, the printed tables, and the files of OUT_DIR.

Figures are named after the learner and the data sets (`figure_stem`):
STEM.png (cumulative online accuracy vs examples seen, one panel per data
set), STEM_window_accuracy.png (accuracy over the last `window` steps) and,
with held-out tests, STEM_test_accuracy.png.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any, Dict, Optional, Sequence

import numpy as np

PANEL_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def checkpoint_label(spec: str) -> str:
    """The name of a learner in tables and plots: pretrained:NAME as given, a
    workdir (or file prefix) by its last path component (runs/quickstart ->
    quickstart)."""
    if spec.startswith("pretrained:"):
        return spec
    return os.path.basename(os.path.normpath(spec)) or spec


def dataset_label(spec: str) -> str:
    """A data set spec's short name: mnist, the file / folder name of npz: and
    idx: sets, the tfds: name; mixture parts joined by "+"."""
    names = []
    for part in re.split(r"[,+]", spec):
        kind, sep, arg = part.partition(":")
        if not sep:
            names.append(part)
        elif kind == "tfds":
            names.append(arg)
        else:
            names.append(os.path.splitext(os.path.basename(os.path.normpath(arg)))[0] or arg)
    return "+".join(names)


def figure_stem(label: Optional[str], datasets: Sequence[str]) -> str:
    """File name stem of the figures: the learner's label (or "baselines") and
    the data sets, e.g. "pretrained_mnist_on_mnist_fashion_mnist"."""
    slug = lambda text: re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "data"
    stem = f"{slug(label) if label else 'baselines'}_on_" + "_".join(
        slug(dataset_label(d)) for d in datasets)
    return stem[:120]  # far below any file system's name limit, with the suffixes


def _wrap_clauses(clauses: Sequence[str], width: int) -> str:
    """The clauses joined by ", ", a new line wherever the next one would pass `width`."""
    lines = [clauses[0]]
    for clause in clauses[1:]:
        if len(lines[-1]) + 2 + len(clause) <= width:
            lines[-1] += f", {clause}"
        else:
            lines[-1] += ","
            lines.append(clause)
    return "\n".join(lines)


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


def figure_files(label: Optional[str], datasets: Sequence[str], held_out: bool
                 ) -> Dict[str, str]:
    """{role: file name} of what `write_report` writes (summary.json's "files")."""
    stem = figure_stem(label, datasets)
    files = {"figure": f"{stem}.png", "window_figure": f"{stem}_window_accuracy.png",
             "curves": "curves.npz"}
    if held_out:
        files["test_figure"] = f"{stem}_test_accuracy.png"
    return files


def write_report(out_dir: str, summary: Dict[str, Any], curves: Dict[str, np.ndarray],
                 started: float) -> None:
    """Writes the figures, curves.npz and summary.json into `out_dir` and
    prints the tables, the parameter counts and what was written.

    Args:
      summary: the content of summary.json (its "settings", "results" and "files").
      curves: {"DATASET/METHOD/cum_acc": [S, T], ".../win_acc": [S, T], and with
        held-out tests ".../test_acc": [S, M], ".../test_steps": [M]}.
      started: time.perf_counter() at the start of the meta-test.
    """
    from vsml_jax import plotting
    settings, results, files = summary["settings"], summary["results"], summary["files"]
    K = settings["stream_batch"]
    cum, win, test = {}, {}, {}
    for dataset, per_method in results.items():
        title = PANEL_TITLES.get(dataset, dataset)
        cum[title] = {m: plotting.mean_std(curves[f"{dataset}/{m}/cum_acc"])
                      for m in per_method}
        win[title] = {m: plotting.mean_std(curves[f"{dataset}/{m}/win_acc"])
                      for m in per_method}
        if "test_figure" in files:
            test[title] = {m: (curves[f"{dataset}/{m}/test_steps"],
                               curves[f"{dataset}/{m}/test_acc"]) for m in per_method}
    xlabel = "examples seen" if not K else f"examples seen ({K} per step)"
    side = math.isqrt(settings["input_size"])
    # About 40 characters fit above one 4.5-inch panel: longer titles break
    # between their clauses.
    title = _wrap_clauses([f"{len(settings['seeds'])} seeds (mean +- std)",
                           f"{side}x{side} inputs", f"{settings['split']} split streams"],
                          40 * len(results))
    plotting.plot_learning_curves(cum, os.path.join(out_dir, files["figure"]),
                                  xlabel=xlabel, x_scale=max(K, 1),
                                  ylabel="cumulative online accuracy", title=title)
    plotting.plot_learning_curves(win, os.path.join(out_dir, files["window_figure"]),
                                  xlabel=xlabel, x_scale=max(K, 1),
                                  ylabel=f"accuracy over last {settings['window']} steps",
                                  title=title)
    if test:
        plotting.plot_held_out_curves(test, os.path.join(out_dir, files["test_figure"]),
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
    print(f"wrote {out_dir}/summary.json, " + ", ".join(files.values())
          + f" in {time.perf_counter() - started:.1f} s", flush=True)
