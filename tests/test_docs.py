"""Numbers in README.md and docs/results.md that come from a JSON summary in
docs/figures/ must equal that summary, rounded as printed: a rerun that
changes a summary (or an edit that changes a number) fails here until the
text follows.

Checked: the demo output block of the README against docs/figures/demo_mnist.json
(what `experiments.demo --summary_json` wrote), the results tables of
docs/results.md against their evaluate summaries, and the numbers quoted in
prose (README headlines, fig. 4 / fig. 5 figures) against their JSONs.
"""
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = os.path.join(ROOT, "docs", "figures")


def _read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def _summary(name):
    return json.loads(_read("docs", "figures", name))


def _flat(text):
    """Text with every run of white space one blank (prose wraps anywhere)."""
    return " ".join(text.split())


# The --checkpoint learner of an evaluate summary: its entry comes first
# (named "vsml" in older summaries, after the checkpoint in newer ones).
CHECKPOINT = "<checkpoint>"


def _metric(summary, dataset, method, metric):
    results = summary["results"][dataset]
    if method == CHECKPOINT:
        method = next(iter(results))
    return results[method]["metrics"][metric]


def _cell(m, std=True):
    """An evaluate metric as the tables print it: 'mean +- std' at 3 decimals."""
    return f"{m['mean']:.3f} +- {m['std']:.3f}" if std else f"{m['mean']:.3f}"


def _table(text, first_header):
    """Rows (lists of cells, markdown bold removed) of the markdown table whose
    header row starts with `first_header`, and its header."""
    lines = [line.strip() for line in text.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header}"))
    split = lambda line: [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        line = line.strip()
        if not line.startswith("|"):
            break
        rows.append(split(line))
    return split(lines[start]), rows


# ------------------------------------------------------------ README demo
def _demo_block():
    readme = _read("README.md")
    m = re.search(r"```\n(Cumulative online accuracy.*?)```", readme, re.S)
    assert m, "README.md has no demo output block (starting 'Cumulative online accuracy')"
    return m.group(1).splitlines()


def test_readme_demo_block_is_the_demo_summary():
    s = _summary("demo_mnist.json")
    lines = _demo_block()
    # The table exactly as experiments/demo.py prints it, rows elided by '...'.
    widths = [max(len(t), 5) for t in s["columns"]]
    header = "examples  " + "  ".join(t.rjust(w) for t, w in zip(s["columns"], widths))
    assert lines[1] == header, f"README demo header {lines[1]!r}, summary gives {header!r}"
    rows = {f"{int(n):8d}  " + "  ".join(f"{a:{w}.3f}" for a, w in zip(acc, widths))
            for n, acc in s["cumulative_accuracy"].items()}
    table = [line for line in lines[2:] if re.match(r"^\s+\d+\s", line)]
    assert table, lines
    for line in table:
        assert line in rows, f"README demo row {line!r} is not in demo_mnist.json"
    last = str(s["episode_length"])
    assert table[-1].split()[0] == last, "the README block must end with the last row"

    # Timing lines: run_s is rounded to 1 ms in the summary, so examples/s is
    # checked to the precision that rounding leaves.
    n = s["episode_length"]
    for title, t in s["run_s"].items():
        line = next((x for x in lines if x.startswith(f"{title}: ")), None)
        assert line, f"README demo block has no timing line for {title!r}"
        m = re.fullmatch(rf"{re.escape(title)}: {n} examples in ([\d.]+) s \(([\d,]+) "
                         r"examples/s\)", line)
        assert m, line
        assert m.group(1) == f"{t:.2f}", f"{line!r}: summary says {t} s"
        rate = float(m.group(2).replace(",", ""))
        assert n / (t + 0.0005) - 1 <= rate <= n / max(t - 0.0005, 1e-9) + 1, (line, t)
    total = f"Total: compile {s['compile_s']:.1f} s + run {sum(s['run_s'].values()):.1f} s " \
            f"on {s['platform']}."
    assert total in lines, f"README demo block lacks {total!r}"


# ------------------------------------------------------ docs/results.md tables
FIG6 = "fig6_pretrained_mnist_summary.json"
OVERFIT = "fig6_meta_rnn_overfitting_summary.json"
CMA = "fig5_cma_es_summary.json"
BATCH64 = "fig5_batch64_summary.json"


def _lr_in_label(label, summary, dataset, method):
    """A label like 'online Adam (lr 1e-3)' must name the rate the sweep chose."""
    m = re.search(r"lr ([\d.e-]+)", label)
    if m:
        lr = summary["results"][dataset][method]["lr"]
        assert float(m.group(1)) == pytest.approx(lr), f"{label!r}: the summary's lr is {lr}"


def test_results_fig6_table():
    s = _summary(FIG6)
    header, rows = _table(_read("docs", "results.md"), "data set | method | N=100")
    metrics = [f"cum_acc@{c[2:].replace(',', '')}" for c in header[2:]]
    datasets = {"MNIST": "mnist", "Fashion-MNIST (unseen)": "fashion_mnist"}
    methods = {"VS-ML (`pretrained:mnist`)": CHECKPOINT, "online Adam": "adam",
               "online SGD": "sgd", "nearest class mean": "nearest_mean",
               "1-nearest neighbour": "nearest_neighbour"}
    assert len(rows) == 10
    for row in rows:
        dataset = datasets[row[0]]
        method = methods[re.sub(r" \(lr .*\)$", "", row[1])]
        _lr_in_label(row[1], s, dataset, method)
        expected = [_cell(_metric(s, dataset, method, k)) for k in metrics]
        assert row[2:] == expected, f"results.md row {row[:2]}: summary gives {expected}"


def test_results_meta_rnn_table():
    s = _summary(OVERFIT)
    header, rows = _table(_read("docs", "results.md"), "method (quick-start budget")
    columns = {"MNIST": "mnist", "Fashion": "fashion_mnist"}
    keys = [(columns[c.split()[0]], f"cum_acc@{c.split('N=')[1].replace(',', '')}")
            for c in header[1:]]
    methods = {"VS-ML, fixed labels": "VS-ML (fixed labels)",
               "Meta RNN, fixed labels": "Meta RNN (fixed labels)",
               "VS-ML, permuted labels (`quickstart.flags`)": "VS-ML (permuted labels)",
               "Meta RNN, permuted labels": "Meta RNN (permuted labels)",
               "online Adam": "adam"}
    assert len(rows) == len(methods)
    for row in rows:
        method = methods[re.sub(r" \(lr .*\)$", "", row[0])]
        _lr_in_label(row[0], s, "mnist", method)
        _lr_in_label(row[0], s, "fashion_mnist", method)
        expected = [_cell(_metric(s, d, method, k)) for d, k in keys]
        assert row[1:] == expected, f"results.md row {row[0]!r}: summary gives {expected}"


def test_results_cma_es_table():
    s = _summary(CMA)
    header, rows = _table(_read("docs", "results.md"), "| MNIST N=300")
    keys = [("mnist", "cum_acc@300", True), ("mnist", "cum_acc@1000", True),
            ("mnist", "final_window_acc", False), ("fashion_mnist", "cum_acc@300", True),
            ("fashion_mnist", "cum_acc@1000", True)]
    assert header[1:] == ["MNIST N=300", "MNIST N=1,000", "last 100 of 1,000",
                          "Fashion N=300", "Fashion N=1,000"]
    methods = {"cloned backprop": "cloned backprop",
               "+ sep-CMA-ES": "cloned backprop + sep-CMA-ES", "SGD, same lr": "tanh_sgd"}
    assert [r[0] for r in rows] == list(methods)
    for row in rows:
        expected = [_cell(_metric(s, d, methods[row[0]], k), std) for d, k, std in keys]
        assert row[1:] == expected, f"results.md row {row[0]!r}: summary gives {expected}"


# ------------------------------------------------------------ quoted in prose
def _pct(x, digits=1):
    return f"{100 * x:.{digits}f}%"


def _prose_claims():
    """(document, text it must contain), each text built from a JSON summary."""
    fig6, over = _summary(FIG6), _summary(OVERFIT)
    batch, fig4 = _summary(BATCH64), _summary("fig4_forward_clone.json")
    fig5, stack = _summary("fig5_backprop_clone.json"), _summary("fig5_stacked_49_32_10.json")
    m = lambda s, d, meth, k="cum_acc@100": _metric(s, d, meth, k)["mean"]
    claims = []

    # README headlines
    f6 = {(d, meth, n): m(fig6, d, meth, f"cum_acc@{n}")
          for d in ("mnist", "fashion_mnist") for meth in (CHECKPOINT, "adam") for n in (100, 1000)}
    claims.append(("README.md",
                   f"cumulative accuracy {f6['mnist', CHECKPOINT, 100]:.3f} after 100 examples, "
                   f"{f6['mnist', CHECKPOINT, 1000]:.3f} after 1,000 (online Adam: "
                   f"{f6['mnist', 'adam', 100]:.3f} / {f6['mnist', 'adam', 1000]:.3f}); on "
                   f"Fashion-MNIST, never seen, {f6['fashion_mnist', CHECKPOINT, 100]:.3f} / "
                   f"{f6['fashion_mnist', CHECKPOINT, 1000]:.3f} (Adam "
                   f"{f6['fashion_mnist', 'adam', 100]:.3f} / "
                   f"{f6['fashion_mnist', 'adam', 1000]:.3f})"))
    claims.append(("README.md",
                   f"learns MNIST in its weights ({m(over, 'mnist', 'Meta RNN (fixed labels)'):.3f}"
                   f" after 100) and is at chance on Fashion-MNIST "
                   f"({m(over, 'fashion_mnist', 'Meta RNN (fixed labels)'):.3f}), where VS-ML "
                   f"trained the same way reaches "
                   f"{m(over, 'fashion_mnist', 'VS-ML (fixed labels)'):.3f}"))
    clone = {d: fig5["summary"][d] for d in ("mnist", "fashion_mnist")}
    sgd = lambda d: next(v for k, v in clone[d].items() if k.startswith("SGD"))
    claims.append(("README.md",
                   f"{_pct(clone['mnist']['cloned backprop']['final_test_acc_mean'])} / "
                   f"{_pct(clone['fashion_mnist']['cloned backprop']['final_test_acc_mean'])} "
                   "test accuracy on MNIST / Fashion-MNIST after 3,000 examples (SGD: "
                   f"{_pct(sgd('mnist')['final_test_acc_mean'])} / "
                   f"{_pct(sgd('fashion_mnist')['final_test_acc_mean'])})"))

    # docs/results.md prose
    vs, adam = m(over, "mnist", "VS-ML (permuted labels)"), m(over, "mnist", "adam")
    fvs, fadam = (m(over, "fashion_mnist", "VS-ML (permuted labels)"),
                  m(over, "fashion_mnist", "adam"))
    claims.append(("docs/results.md",
                   f"beats tuned Adam by {100 * (round(vs, 3) - round(adam, 3)):.1f} points on "
                   f"MNIST ({vs:.3f} vs {adam:.3f}) and "
                   f"{100 * (round(fvs, 3) - round(fadam, 3)):.1f} on Fashion-MNIST "
                   f"({fvs:.3f} vs {fadam:.3f})"))
    y = {d: [m(fig6, d, k) for k in (CHECKPOINT, "nearest_mean", "nearest_neighbour")]
         for d in ("mnist", "fashion_mnist")}
    claims.append(("docs/results.md",
                   f"({y['mnist'][0]:.3f} vs {y['mnist'][1]:.3f} / {y['mnist'][2]:.3f} on MNIST, "
                   f"{y['fashion_mnist'][0]:.3f} vs {y['fashion_mnist'][1]:.3f} / "
                   f"{y['fashion_mnist'][2]:.3f} on Fashion-MNIST)"))
    best = {d: (max(m(fig6, d, k) for k in ("nearest_mean", "nearest_neighbour")),
                max(m(fig6, d, k, "cum_acc@1000") for k in ("nearest_mean", "nearest_neighbour")))
            for d in ("mnist", "fashion_mnist")}
    claims.append(("docs/results.md",
                   f"(best of the two: MNIST {best['mnist'][0]:.3f} / {best['mnist'][1]:.3f}, "
                   f"Fashion-MNIST {best['fashion_mnist'][0]:.3f} / "
                   f"{best['fashion_mnist'][1]:.3f})"))
    for d, name in (("mnist", "MNIST"), ("fashion_mnist", "Fashion-MNIST")):
        c, s_ = clone[d]["cloned backprop"], sgd(d)
        claims.append(("docs/results.md",
                       f"**{name} {_pct(c['final_test_acc_mean'])} +- "
                       f"{100 * c['final_test_acc_std']:.1f}**"))
        claims.append(("docs/results.md",
                       f"{_pct(s_['final_test_acc_mean'])} +- {100 * s_['final_test_acc_std']:.1f}"))
    b = lambda d, meth: _metric(batch, d, meth, "test_acc_final")
    bc, bs = "cloned backprop (64 averaged copies)", "SGD (minibatch 64)"
    claims.append(("docs/results.md",
                   f"MNIST {_pct(b('mnist', bc)['mean'])} +- {100 * b('mnist', bc)['std']:.1f} vs "
                   f"SGD {_pct(b('mnist', bs)['mean'])} +- {100 * b('mnist', bs)['std']:.1f}, "
                   f"Fashion-MNIST {_pct(b('fashion_mnist', bc)['mean'])} +- "
                   f"{100 * b('fashion_mnist', bc)['std']:.1f} vs "
                   f"{_pct(b('fashion_mnist', bs)['mean'])} +- "
                   f"{100 * b('fashion_mnist', bs)['std']:.1f}"))
    claims.append(("docs/results.md",
                   f"mean absolute error {_pct(fig4['random_relative_mean_abs_error'], 2)} of "
                   f"the target's spread"))
    claims.append(("docs/results.md",
                   f"({_pct(fig4['grid_relative_mean_abs_error'], 2)} on the plotted (x, w) "
                   f"grid, largest error {fig4['grid_max_abs_error']:.3f}), after "
                   f"{fig4['warmup']} warm-up steps"))
    claims.append(("docs/results.md",
                   f"is worse ({_pct(fig4['first_pass_random_relative_mean_abs_error'], 0)})"))
    st = stack["summary"]["mnist"]
    deep = st["cloned backprop 49-32-10"]
    claims.append(("docs/results.md",
                   f"the stack reaches {_pct(deep['final_test_acc_mean'])} +- "
                   f"{100 * deep['final_test_acc_std']:.1f} (seeds "
                   + ", ".join(_pct(x) for x in deep["final_test_acc_per_seed"])
                   + f") against {_pct(st['cloned backprop']['final_test_acc_mean'])} for the "
                   f"single cloned layer and "
                   f"{_pct(next(v for k, v in st.items() if k.startswith('SGD 49'))['final_test_acc_mean'])}"
                   " for SGD on the same stack"))
    return claims


@pytest.mark.parametrize("doc,text", _prose_claims(),
                         ids=lambda v: v if v.endswith(".md") else v[:40])
def test_prose_numbers_match_summaries(doc, text):
    assert _flat(text) in _flat(_read(doc)), (
        f"{doc} does not say {text!r}, which is what the JSON summary in docs/figures/ gives")
