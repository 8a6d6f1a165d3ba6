"""`python -m experiments.benchmark`: the flags, the run of the chosen sections
and the files written (see the package doc)."""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, Sequence

from absl import app, flags

import experiments.benchmark as package
from experiments import common
from experiments.benchmark.ablation import ablation
from experiments.benchmark.bptt import _chunk_for, bptt, bptt_memory
from experiments.benchmark.forward import forward
from experiments.benchmark.harness import SCALING_RESULT_TAG
from experiments.benchmark.population import population
from experiments.benchmark.report import check_targets, to_markdown
from experiments.benchmark.roofline import roofline
from experiments.benchmark.scaling import scaling, scaling_worker
from experiments.benchmark.tools import (NUM_CPU_DEVICES, PAPER, REDUCED, SECTIONS,
                                         machine_info)

flags.DEFINE_string("out", "benchmark.json", "Where the JSON results are written.")
flags.DEFINE_string("markdown", None, "Also write the results tables as markdown here.")
flags.DEFINE_bool("quick", False, "Small and fast run (short episodes, 1-2 repeats): a smoke "
                  "test of the benchmark, not numbers to quote.")
flags.DEFINE_integer("repeats", None, "Timed calls per measurement (default 5, quick 2).")
flags.DEFINE_list("sections", ["roofline", "forward", "ablation", "bptt", "memory",
                               "population"], "Which parts to run (also: scaling, "
                  "which starts worker processes and is not run by default).")
flags.DEFINE_string("scaling_worker", None, "Internal: run one scaling measurement "
                    "described by this JSON and print its result (used by "
                    "--sections=scaling, which starts these workers).")
FLAGS = flags.FLAGS
__doc__ = package.__doc__  # what --help shows


# -------------------------------------------------------------------- main
def run(quick: bool, repeats: int, sections: Sequence[str]) -> Dict:
    r: Dict = dict(quick=quick, machine=machine_info())
    T_fwd = 20 if quick else 100
    T_bptt = 20 if quick else 100
    mem_Ts = (20, 80, 320) if quick else (100, 500, 2000)
    T_pop = 20 if quick else 100
    pops = (4, 16) if quick else (16, 64)
    if "roofline" in sections or "forward" in sections:
        r["roofline"] = roofline(repeats, quick)
        print("roofline", json.dumps({k: round(v.get("gflops", v.get("gelem_per_s", 0)), 3)
                                       for k, v in r["roofline"].items()}), flush=True)
    if "forward" in sections:
        r["forward"] = []
        for sizes in (PAPER, REDUCED):
            for batch in (None, 4 if quick else 16):
                per = {}
                for impl in ("fast", "reference"):
                    f = forward(sizes, batch, impl, T_fwd, repeats, r["roofline"])
                    per[impl] = f
                    r["forward"].append(f)
                    print(f"forward {sizes} batch={f['batch']} {impl}: "
                          f"{f['cell_ticks_per_s']/1e6:.2f} M cell-ticks/s", flush=True)
                per["fast"]["speedup_vs_reference"] = (per["fast"]["cell_ticks_per_s"]
                                                       / per["reference"]["cell_ticks_per_s"])
                per["reference"]["speedup_vs_reference"] = 1.0
    if "ablation" in sections:
        r["ablation"] = ablation(PAPER, T_fwd, repeats)
        print("ablation", {k: round(v["ms_per_step"], 3) for k, v in r["ablation"].items()
                           if isinstance(v, dict)}, flush=True)
    if "bptt" in sections:
        r["bptt"] = []
        chunk = _chunk_for(T_bptt)
        for impl, remat, ch in [("fast", False, None), ("fast", True, None),
                                ("fast", True, chunk), ("reference", True, None),
                                ("reference", False, None)]:
            b = bptt(PAPER, impl, T_bptt, 4, remat, ch, max(1, min(repeats, 3)),
                     max_mib=8192)
            r["bptt"].append(b)
            print(f"bptt {impl} remat={remat} chunk={ch}: mem {b['memory']['total_mib']:.0f} MiB"
                  + ("" if "skipped" in b else f" grad {b['grad_time']['median']:.2f}s ratio "
                     f"{b['grad_over_forward']:.2f}"), flush=True)
    if "memory" in sections:
        r["memory"] = bptt_memory(PAPER, "fast", mem_Ts, 4)
        print("memory", [(m["T"], m["remat"], m["remat_chunk"], round(m["total_mib"]))
                         for m in r["memory"]], flush=True)
    if "population" in sections:
        r["population"] = [population(sizes, pops, T_pop, (2, NUM_CPU_DEVICES),
                                      max(1, min(repeats, 3)))
                           for sizes in (PAPER, REDUCED)]
        print("population done", flush=True)
    if "scaling" in sections:
        r["scaling"] = scaling(quick, repeats)
    r["machine"]["loadavg_end"] = list(os.getloadavg())
    r["targets"] = check_targets(r)
    return r


def main(argv):
    del argv
    if FLAGS.scaling_worker:  # a fresh process: JAX must not have started yet
        result = scaling_worker(json.loads(FLAGS.scaling_worker))
        print(SCALING_RESULT_TAG + json.dumps(result), flush=True)
        return
    import jax
    # Before anything touches the backend: 8 CPU devices for the sharded runs.
    jax.config.update("jax_num_cpu_devices", NUM_CPU_DEVICES)
    repeats = FLAGS.repeats or (2 if FLAGS.quick else 5)
    unknown = set(FLAGS.sections) - set(SECTIONS)
    if unknown:
        raise app.UsageError(f"--sections: unknown {sorted(unknown)}; choose from "
                             f"{', '.join(SECTIONS)}.")
    results = run(FLAGS.quick, repeats, FLAGS.sections)
    md = to_markdown(results)
    print(md)
    with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=1)
    if FLAGS.markdown:
        with open(FLAGS.markdown, "w") as f:
            f.write(md + "\n")
    print(f"wrote {FLAGS.out}" + (f" and {FLAGS.markdown}" if FLAGS.markdown else ""))



if __name__ == "__main__":
    # Not common.run: the scaling workers join their jax.distributed jobs
    # themselves, and the main process must not start JAX before main().
    common.exit_if_help_asked(sys.argv[1:])
    app.run(main)
