"""Learning-curve figures (matplotlib, Agg backend: files only, no display).

    plot_learning_curves({"MNIST": {"vsml": (mean [T], std [T]), "adam": ...},
                          "Fashion-MNIST": {...}}, "fig6.png")

draws one panel per dataset and one line per method with a +-1 std band, in
the style of the paper's fig. 6 (cumulative online accuracy vs examples seen).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import matplotlib

matplotlib.use("Agg")  # before pyplot: render to files on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Curve = Tuple[np.ndarray, np.ndarray]  # (mean [T], std [T])


def mean_std(curves: np.ndarray) -> Curve:
    """Per-step mean and std (ddof=0) over seeds of curves [S, T]."""
    curves = np.asarray(curves, np.float64)
    return curves.mean(axis=0), curves.std(axis=0)


def plot_learning_curves(panels: Mapping[str, Mapping[str, Curve]], path: str, *,
                         ylabel: str = "cumulative accuracy",
                         xlabel: str = "examples seen",
                         x_scale: int = 1, title: Optional[str] = None,
                         ylim: Optional[Tuple[float, float]] = (0.0, 1.0)) -> str:
    """Saves a row of panels with shaded mean +- std curves.

    Args:
      panels: {panel title: {method: (mean [T], std [T])}}; step t is plotted at
        x = (t + 1) * x_scale.
      path: output image file (.png, .pdf, ...).
      ylabel, xlabel, title: labels.
      x_scale: examples per step (e.g. K for batch-averaged streams).
      ylim: y range, None for automatic.
    Returns:
      path.
    """
    if not panels:
        raise ValueError("plot_learning_curves: nothing to plot (no panels).")
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(m for curves in panels.values() for m in curves))
    for ax, (panel, curves) in zip(axes[0], panels.items()):
        for method, (mean, std) in curves.items():
            mean, std = np.asarray(mean), np.asarray(std)
            x = np.arange(1, mean.shape[0] + 1) * x_scale
            color = colors[methods.index(method) % len(colors)]
            ax.plot(x, mean, label=method, color=color, lw=1.5)
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, lw=0)
        _dress(ax, panel, xlabel, ylabel, ylim)
    return _save(fig, path, title)


def _dress(ax, panel: str, xlabel: str, ylabel: str, ylim) -> None:
    """Title, labels, limits, grid and legend of one panel."""
    ax.set_title(panel)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def _save(fig, path: str, title: Optional[str]) -> str:
    """Writes the figure to path (with an overall title) and closes it."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def learning_curve_panels(results: Mapping[str, Mapping[str, np.ndarray]]
                          ) -> Dict[str, Dict[str, Curve]]:
    """{dataset: {method: curves [S, T]}} -> {dataset: {method: (mean, std)}}."""
    return {d: {m: mean_std(c) for m, c in methods.items()} for d, methods in results.items()}


def plot_held_out_curves(panels: Dict[str, Dict[str, Tuple[np.ndarray, np.ndarray]]],
                         path: str, *, xlabel: str = "examples seen",
                         ylabel: str = "held-out accuracy", x_scale: int = 1,
                         title: Optional[str] = None) -> str:
    """Saves one panel per dataset of held-out accuracy, mean +- std over seeds.

    Args:
      panels: {panel title: {method: (test_steps [E], test_acc [S, E])}}.
      path: output image file.
      xlabel, ylabel: axis labels.
      x_scale: x = test_steps * x_scale (e.g. K examples per step).
    Returns:
      path.
    """
    # Not plot_learning_curves: that one draws dense per-step curves from
    # step 1; these are sparse and start before the first step.
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(m for curves in panels.values() for m in curves))
    for ax, (panel, curves) in zip(axes[0], panels.items()):
        for method, (steps, acc) in curves.items():
            mean, std = mean_std(acc)
            x = np.asarray(steps) * x_scale
            color = colors[methods.index(method) % len(colors)]
            ax.plot(x, mean, label=method, color=color, lw=1.5, marker=".")
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, lw=0)
        _dress(ax, panel, xlabel, ylabel, (0.0, 1.0))
    return _save(fig, path, title)
