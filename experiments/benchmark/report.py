"""The results as markdown tables, and the checks of the performance targets."""
from __future__ import annotations

from typing import Dict, List

from experiments.benchmark.scaling import scaling_markdown
from experiments.benchmark.tools import PAPER, SECTIONS, _fmt_t


def _remat_label(row) -> str:
    """How a BPTT row rematerialised: "chunk k", "step" or "off"."""
    chunk = row["remat_chunk"]
    if isinstance(chunk, (list, tuple)):
        return "nested chunks " + " x ".join(map(str, chunk))
    if chunk:
        return "chunk %d" % chunk
    return "step" if row["remat"] else "off"


def _bptt_row_head(b: Dict) -> str:
    """The "| sizes | impl | episodes x T | remat |" cells of a BPTT table row."""
    return (f"| {b['sizes'][0]}->{b['sizes'][1]} | {b['impl']} | {b['episodes']} x {b['T']} "
            f"| {_remat_label(b)} |")


def to_markdown(r: Dict) -> str:
    """The results as markdown tables (what README / BENCHMARK.md quote)."""
    m = r["machine"]
    # The scaling section's devices are its workers' (in its table), not this process's.
    in_process = any(k in r for k in SECTIONS if k != "scaling")
    devices = f", {m['devices']} virtual CPU devices" if in_process else ""
    lines = [f"Measured {m['date']} with jax {m['jax_version']} on {m['cpu_model']} "
             f"({m['cpu_count']} cores{devices}); load average "
             f"{m['loadavg_start'][0]:.1f} at start, {m.get('loadavg_end', [float('nan')])[0]:.1f}"
             f" at end{' (--quick: not numbers to quote)' if r['quick'] else ''}. Times in s: "
             "median [min, max].", ""]
    if "roofline" in r:
        ro = r["roofline"]
        lines += ["| roofline | rate |", "|---|---|",
                  f"| matmul {ro['matmul']['n']}^2 float32 | {ro['matmul']['gflops']:.1f} GFLOP/s |",
                  f"| tanh, {ro['tanh_big']['elements']} elements | "
                  f"{ro['tanh_big']['gelem_per_s']:.2f} G/s |",
                  f"| tanh, cache-resident ({ro['tanh_cache']['elements']} x "
                  f"{ro['tanh_cache']['loops']}) | {ro['tanh_cache']['gelem_per_s']:.2f} G/s |", ""]
    if "forward" in r:
        lines += ["| forward unroll | impl | batch | T | time | steps/s | cell-ticks/s | "
                  "GFLOP/s | of matmul rate | of limit | speed-up |", "|---" * 11 + "|"]
        for f in r["forward"]:
            lines.append(
                f"| {f['sizes'][0]}->{f['sizes'][1]} | {f['impl']} | {f['batch']} | {f['T']} | "
                f"{_fmt_t(f['time'])} | {f['steps_per_s']:.0f} | {f['cell_ticks_per_s']/1e6:.2f} M | "
                f"{f['gflops']:.1f} | {100*f.get('fraction_of_matmul_rate', float('nan')):.1f}% | "
                f"{100*f.get('fraction_of_limit', float('nan')):.0f}% | "
                f"{f.get('speedup_vs_reference', float('nan')):.2f}x |")
        lines.append("")
    if "ablation" in r:
        a = r["ablation"]
        lines += [f"| micro ticks only, 784->10, batch 1 ({a['tiles']} tiles) | ms/step | "
                  "cell-ticks/s |", "|---|---|---|"]
        for k in ("full", "untiled", "no_tanh", "no_matmul", "no_tanh_no_matmul"):
            lines.append(f"| {k} | {a[k]['ms_per_step']:.3f} | "
                         f"{a[k]['cell_ticks_per_s']/1e6:.2f} M |")
        lines.append("")
    if "bptt" in r:
        lines += ["| BPTT meta-gradient | impl | episodes x T | remat | grad time | "
                  "forward time | grad/forward | steps/s | memory (MiB) |", "|---" * 9 + "|"]
        for b in r["bptt"]:
            if "skipped" in b:
                lines.append(f"{_bptt_row_head(b)} not run: {b['skipped']} | | | | "
                             f"{b['memory']['total_mib']:.0f} |")
                continue
            lines.append(
                f"{_bptt_row_head(b)} {_fmt_t(b['grad_time'])} | {_fmt_t(b['forward_time'])} | "
                f"{b['grad_over_forward']:.2f} | {b['steps_per_s']:.3f} | "
                f"{b['memory']['total_mib']:.0f} |")
        lines.append("")
    if "memory" in r:
        lines += ["| BPTT memory (compiled, MiB) | impl | episodes x T | remat | temp | "
                  "total |", "|---" * 6 + "|"]
        for b in r["memory"]:
            lines.append(f"{_bptt_row_head(b)} {b['temp_mib']:.0f} | {b['total_mib']:.0f} |")
        lines.append("")
    if "population" in r:
        lines += ["| ES population | population | devices | how | time | episodes/s | "
                  "per-episode cost / single episode | equal to vmap, 1 device |",
                  "|---" * 8 + "|"]
        for p in r["population"]:
            s = p["single_episode"]
            lines.append(f"| {p['sizes'][0]}->{p['sizes'][1]}, T={p['T']} | 1 | 1 | no vmap | "
                         f"{_fmt_t(s['time'])} | {s['episodes_per_s']:.2f} | 1.00 | |")
            for q in p["runs"]:
                eq = "" if "bitwise_equal" not in q else (
                    "bitwise" if q["bitwise_equal"] else
                    f"{'allclose' if q['allclose'] else 'NO'} (max diff "
                    f"{q['max_abs_diff_vs_unsharded']:.1e})")
                lines.append(f"| | {q['population']} | {q['devices']} | {q.get('mode', '')} | "
                             f"{_fmt_t(q['time'])} | "
                             f"{q['episodes_per_s']:.2f} | {q['per_episode_over_single']:.2f} | "
                             f"{eq} |")
        lines.append("")
    if "scaling" in r:
        lines += scaling_markdown(r["scaling"])
    if r.get("targets"):
        lines += ["| target | measured | met |", "|---|---|---|"]
        for t in r["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


def check_targets(r: Dict) -> List[Dict]:
    """The product targets, evaluated on this run's numbers."""
    out = []

    def add(target, measured, met):
        out.append(dict(target=target, measured=measured, met=bool(met)))

    fw = {(tuple(f["sizes"]), f["impl"], f["batch"]): f for f in r.get("forward", [])}
    fast, ref = fw.get((PAPER, "fast", 1)), fw.get((PAPER, "reference", 1))
    if fast and ref:
        s = fast["cell_ticks_per_s"] / ref["cell_ticks_per_s"]
        add("forward 784->10 batch 1: >= 4x the reference's cell-ticks/s",
            f"{s:.2f}x ({fast['cell_ticks_per_s']/1e6:.1f} M/s vs "
            f"{ref['cell_ticks_per_s']/1e6:.1f} M/s)", s >= 4)
    bp = {(b["impl"], b["remat"], b["remat_chunk"]): b for b in r.get("bptt", [])
          if "skipped" not in b}
    head = bp.get(("fast", False, None))  # custom VJP, no remat: the default setting
    if head:
        add("BPTT grad/forward time ratio <= 3.5 (fast, no remat)",
            f"{head['grad_over_forward']:.2f}", head["grad_over_forward"] <= 3.5)
        add("BPTT memory 4 x T=100, 784->10 <= 1 GB (fast, no remat)",
            f"{head['memory']['total_mib']:.0f} MiB", head["memory"]["total_mib"] <= 1024)
    for ref_key, name in [(("reference", False, None), "no remat"),
                          (("reference", True, None), "remat per step")]:
        ref_b = bp.get(ref_key)
        if head and ref_b:
            s = ref_b["grad_time"]["median"] / head["grad_time"]["median"]
            add(f"BPTT meta-gradient steps/s >= 5x the reference's (reference {name})",
                f"{s:.2f}x", s >= 5)
    memory = r.get("memory", [])
    base = [m for m in memory if not m["remat"]]
    for label, rows in [("remat_chunk ~ sqrt(T)", [m for m in memory
                                                    if isinstance(m["remat_chunk"], int)]),
                        ("two nested chunks ~ T^(1/3)", [m for m in memory if isinstance(
                            m["remat_chunk"], (list, tuple))])]:
        if len(rows) < 2 or not base:
            continue
        lo, hi = min(rows, key=lambda m: m["T"]), max(rows, key=lambda m: m["T"])
        b0 = min(base, key=lambda m: m["T"])
        ratio = hi["total_mib"] / b0["total_mib"]
        add(f"BPTT memory with remat ({label}) at T={hi['T']} <= 3x the memory at "
            f"T={b0['T']} (no remat)",
            f"{ratio:.2f}x ({hi['total_mib']:.0f} vs {b0['total_mib']:.0f} MiB)", ratio <= 3)
        ratio = hi["total_mib"] / lo["total_mib"]
        add(f"BPTT memory with remat at T={hi['T']} <= 3x that at T={lo['T']} (both "
            f"{label})",
            f"{ratio:.2f}x ({hi['total_mib']:.0f} vs {lo['total_mib']:.0f} MiB)", ratio <= 3)
    for p in r.get("population", []):
        if tuple(p["sizes"]) != PAPER:
            continue
        for q in p["runs"]:
            if q["population"] == 64 and q["devices"] == 1:
                add(f"population 64 ({q.get('mode')}): per-episode cost <= a single "
                    "episode's (784->10)",
                    f"{q['per_episode_over_single']:.2f}", q["per_episode_over_single"] <= 1)
    return out
