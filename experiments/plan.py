r"""Plan a run before you rent it: compile it for a TPU slice or NVIDIA GPU that is not here.

    python -m experiments.plan --target=tpu-v5e-32 \
        --flagfile=experiments/configs/fig6_mnist.flags --batch_size=256
    python -m experiments.plan --target=gpu-h200 --flagfile=experiments/configs/fig6_mnist.flags
    python -m experiments.plan --target=tpu-v4-256 --flagfile=experiments/configs/fig6_mnist.flags \
        --batch_size=32768 --episode_length=500 --fit
    python -m experiments.plan --table=docs/accelerators.md   # every shipped flagfile

Takes the flags of experiments.meta_train (or, with --stage or
--program=clone, those of experiments.clone) and prints, per program of the
run, whether it fits the target's memory, its loops' kernels, collectives and
a step-time lower bound (`vsml_jax.runs.plan`). Nothing runs on the target;
everything compiles on this machine's CPU with the target's compiler (pip
extras `tpu-aot` / `gpu-aot`, BUILD.md). --workdir is not needed.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

# Before anything can start a JAX backend: the planner never runs on a device.
os.environ["JAX_PLATFORMS"] = "cpu"


def _program_from_argv(argv) -> str:
    """"clone" if the command line or a flagfile sets --stage (or --program=clone)."""
    def lines(args, depth=0):
        for a in args:
            yield a
            if a.startswith("--flagfile=") and depth < 5:
                path = a.split("=", 1)[1]
                if os.path.isfile(path):
                    with open(path) as f:
                        yield from lines([l.strip() for l in f], depth + 1)
    for a in lines(argv):
        if a.startswith("--program="):
            return a.split("=", 1)[1]
        if a.startswith("--stage"):
            return "clone"
    return "meta_train"


PROGRAM = _program_from_argv(sys.argv[1:])

from absl import app, flags  # noqa: E402

from experiments import common  # noqa: E402

if PROGRAM == "clone":
    from experiments import clone as run_flags  # noqa: E402  (defines the clone flags)
else:
    from experiments import meta_train as run_flags  # noqa: E402,F811

FLAGS = flags.FLAGS
FLAGS.set_default("workdir", "unused")  # a plan writes no run folder
flags.DEFINE_enum("program", PROGRAM, ["meta_train", "clone"], "Which run the flags "
                  "describe (clone: the flags of experiments.clone; set by --stage).")
flags.DEFINE_string("target", None, "tpu-v4-N, tpu-v5p-N (N TensorCores), tpu-v5e-N, "
                    "tpu-v6e-N (N chips), gpu-h100 / gpu-h200 / gpu-a100 [xK].")
flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")
flags.DEFINE_string("dump_hlo", None, "Write each program's optimised HLO text into "
                    "this folder.")
flags.DEFINE_boolean("fit", False, "If the training program does not fit, search "
                     "--micro_batch / --member_batch, then --remat_chunk, and say what fits.")
flags.DEFINE_list("programs", None, "Compile only these programs (bptt_step, "
                  "es_generation, clone_step, meta_test; default: all of the run).")
flags.DEFINE_string("table", None, "Write the table of every shipped flagfile on "
                    "--table_targets (float32 and bfloat16, with --fit) to this Markdown "
                    "file, e.g. docs/accelerators.md.")
flags.DEFINE_list("table_targets", ["tpu-v4-8", "gpu-h200", "tpu-v5e-32", "tpu-v5e-8"],
                  "Targets of --table.")
flags.DEFINE_list("table_bfloat16_targets", ["tpu-v5e-32", "gpu-h200"], "Targets of "
                  "--table that also get the bfloat16 rows of the meta-training flagfiles.")
flags.DEFINE_string("table_cache", "/tmp/vsml_plan_table", "Folder of --table's per-"
                    "target results; a rerun reuses them (delete it to compile anew).")
flags.DEFINE_boolean("table_from_cache", False, "--table from the cached rows only "
                     "(compiles nothing; rows not planned yet are left out).")
flags.DEFINE_string("table_worker", None, "Internal to --table: plan the flagfiles "
                    "listed in this JSON file for --target and write the rows next to it.")


def _config():
    from vsml_jax.runs.clone import CloneConfig
    from vsml_jax.runs.meta_train import ARCH_DEFAULTS, MetaTrainConfig
    if PROGRAM == "clone":
        return common.config_from_flags(CloneConfig)
    try:
        remat_chunk = run_flags._remat_chunk(FLAGS.remat_chunk)
    except ValueError:
        raise app.UsageError(f"--remat_chunk={','.join(FLAGS.remat_chunk)}: use "
                             "integers, e.g. 10 or 10,10 (0: off).") from None
    return common.config_from_flags(MetaTrainConfig, unset_is_none=ARCH_DEFAULTS,
                                    convert={"remat_chunk": lambda _: remat_chunk})


TRAIN_PROGRAMS = ("bptt_step", "es_generation", "clone_step")


def _table_row(flagfile: str, dtype: Optional[str], target, extra=()) -> dict:
    """Plans the training program of one flagfile on `target` (in this process,
    whose flags are parsed anew for it) and returns its row of the table."""
    from vsml_jax.runs import plan as planner
    from vsml_jax.runs.common import SettingsError
    argv = [sys.argv[0], f"--flagfile={flagfile}", f"--program={PROGRAM}",
            f"--target={target.name}"]
    if dtype:
        argv.append(f"--dtype={dtype}")
    argv += list(extra)
    init = _flag_in_file(flagfile, "init_checkpoint")
    if init and (dtype or not init.startswith("pretrained:")):
        # A workdir of an earlier stage is not shipped, and a checkpoint fixes
        # the dtype: plan such runs from scratch with the flags' architecture.
        argv.append("--init_checkpoint=")
    FLAGS.unparse_flags()
    FLAGS(argv)
    row = {"flagfile": " ".join([os.path.basename(flagfile)] + list(extra)),
           "target": target.name,
           "dtype": dtype or "float32", "from_scratch": bool(init) and
           "--init_checkpoint=" in argv}
    try:
        report = planner.plan(_config(), target, fit=True, programs=TRAIN_PROGRAMS)
    except (SettingsError, ValueError, app.UsageError) as e:
        row["error"] = str(e).splitlines()[0]
        return row
    except Exception as e:  # noqa: BLE001 - one failing run must not stop the table
        lines = [l for l in str(e).splitlines() if l.strip()]
        row["error"] = (f"compiling failed: {type(e).__name__}: "
                        f"{lines[0][:200] if lines else ''}")
        return row
    p = report.programs[0]
    row.update(program=p.name, fits=p.fits, memory=p.device_memory_bytes,
               capacity=p.device_capacity_bytes, chosen=p.chosen,
               kernels=p.kernels_per_time_step, trips=[l["trip_count"] for l in p.loops],
               collectives=p.collectives.get("count", 0),
               collectives_in_loops=p.collectives_in_loops,
               lower_bound_s=p.step_time_lower_bound_s, settings=p.settings)
    return row


def _flag_in_file(path: str, name: str) -> Optional[str]:
    with open(path) as f:
        for line in f:
            if line.strip().startswith(f"--{name}="):
                return line.strip().split("=", 1)[1]
    return None


def _table_worker():
    """Plans the rows listed in --table_worker (one target, one kind of run)."""
    import json
    from vsml_jax import accelerators
    with open(FLAGS.table_worker) as f:
        job = json.load(f)
    target = accelerators.get(job["target"])
    out_path = FLAGS.table_worker.replace(".job.json", ".rows.json")
    rows = []
    if os.path.exists(out_path):  # resume a stopped table
        with open(out_path) as f:
            rows = json.load(f)
    done = {(r["flagfile"], r["dtype"]) for r in rows}
    for flagfile, dtype, *extra in job["rows"]:
        extra = extra[0] if extra else []
        name = " ".join([os.path.basename(flagfile)] + extra)
        if (name, dtype or "float32") in done:
            continue
        print(f"{target.name}: {name} {dtype or ''}", file=sys.stderr, flush=True)
        rows.append(_table_row(flagfile, dtype, target, extra))
        with open(out_path, "w") as f:  # after every row: a stopped table keeps its rows
            json.dump(rows, f, indent=1)


def _write_table(path: str):
    """Runs one worker process per (target, kind of run) and writes the Markdown table."""
    import glob
    import json
    import subprocess
    from vsml_jax import accelerators
    os.makedirs(FLAGS.table_cache, exist_ok=True)
    files = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "configs",
                                          "*.flags")))
    kinds = {f: _program_from_argv([f"--flagfile={f}"]) for f in files}
    jobs = []  # (target, kind of run, cache name, [(flagfile, dtype, extra flags)])
    for name in FLAGS.table_targets:
        for kind in ("meta_train", "clone"):
            job = [(os.path.relpath(f), None, []) for f in files if kinds[f] == kind]
            if kind == "meta_train" and name in FLAGS.table_bfloat16_targets:
                job += [(os.path.relpath(f), "bfloat16", []) for f in files
                        if kinds[f] == kind]
            jobs.append((name, kind, f"{name}.{kind}", job))
    for name in PAPER_TARGETS:
        jobs.append((name, "meta_train", f"{name}.paper",
                     [(os.path.relpath(os.path.join(os.path.dirname(__file__), "configs",
                                                    f)), None, extra)
                      for f, extra in PAPER_ROWS]))
    rows, paper = [], []
    for name, kind, cache, job in jobs:
        stem = os.path.join(FLAGS.table_cache, cache)
        done = []
        if os.path.exists(stem + ".rows.json"):
            with open(stem + ".rows.json") as f:
                done = json.load(f)
        if len(done) < len(job) and not FLAGS.table_from_cache:
            with open(stem + ".job.json", "w") as f:
                json.dump({"target": name, "rows": job}, f)
            subprocess.run([sys.executable, "-m", "experiments.plan", f"--program={kind}",
                            f"--table_worker={stem}.job.json"], check=False)
        if os.path.exists(stem + ".rows.json"):
            with open(stem + ".rows.json") as f:
                done = json.load(f)
        order = {(" ".join([os.path.basename(f)] + e), d or "float32"): i
                 for i, (f, d, e) in enumerate(job)}
        done = sorted(done, key=lambda r: order.get((r["flagfile"], r["dtype"]), 0))
        (paper if cache.endswith(".paper") else rows).extend(done)
    with open(path, "w") as f:
        f.write(_markdown(rows, paper))
    print(f"wrote {path} ({len(rows) + len(paper)} rows)")


# The paper's table-1 batch of fig. 6 (32,768 episodes of 500 steps) on 256-chip
# slices, as it ships (remat chunks of 20) and with plain per-step remat.
PAPER_TARGETS = ("tpu-v4-256", "tpu-v5e-256")
PAPER_ROWS = [("fig6_mnist.flags", ["--batch_size=32768", "--episode_length=500"]),
              ("fig6_mnist.flags", ["--batch_size=32768", "--episode_length=500",
                                    "--remat_chunk=0"])]


def _markdown(rows, paper) -> str:
    from vsml_jax import hlo_stats
    gb = lambda b: f"{b / 2**30:.3g}"
    out = [TABLE_HEAD.format(targets=", ".join(f"`{t}`" for t in FLAGS.table_targets),
                             bf16=", ".join(f"`{t}`" for t in FLAGS.table_bfloat16_targets),
                             formula=hlo_stats.LOWER_BOUND_FORMULA),
           "| flagfile | target | dtype | program | fits | GiB per device (of) | "
           "--fit chose | kernels per while body (trips) | collectives (in loops) | "
           "step time >= |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    header = out[1:]

    def add(r):
        head = (f"| {r['flagfile']}{' *' if r.get('from_scratch') else ''} | {r['target']} "
                f"| {r['dtype']} ")
        if "error" in r:
            out.append(head + f"| — | — | — | — | — | — | {r['error']} |")
            return
        chosen = r["chosen"] or "nothing:"  # (cloning runs are not searched)
        chosen = ("—" if chosen.startswith("nothing:") else
                  chosen.replace("(the largest", "(largest"))
        kernels = ", ".join(f"{k} (x{t or '?'})" for k, t in zip(r["kernels"], r["trips"]))
        bound = ("n/a (GPU)" if r["lower_bound_s"] is None
                 else f"{r['lower_bound_s'] * 1e3:.3g} ms")
        out.append(head + f"| {r['program']} | {'yes' if r['fits'] else '**no**'} | "
                   f"{gb(r['memory'])} ({gb(r['capacity'])}) | {chosen} | {kernels} | "
                   f"{r['collectives']} ({r['collectives_in_loops']}) | {bound} |")

    for r in rows:
        add(r)
    if paper:
        out += ["", "## The paper's batch on 256-chip slices", "",
                "Figure 6's run at the paper's table-1 batch: 32,768 episodes of 500 "
                "steps per meta-training step (`fig6_mnist.flags --batch_size=32768 "
                "--episode_length=500`), as shipped (remat chunks of 20 steps) and with "
                "per-step remat only (`--remat_chunk=0`), where the whole batch does "
                "not fit and `--fit` picks the micro-batch. A chosen `--micro_batch` "
                "runs the batch in groups of that many episodes (over all chips) "
                "inside the step: the same gradient.", ""] + header
        for r in paper:
            add(r)
    out.append("")
    out.append(f"Generated by `python -m experiments.plan --table=docs/accelerators.md` "
               f"({len(rows) + len(paper)} rows; results cached in --table_cache, "
               "so a rerun compiles only what is missing).")
    return "\n".join(out) + "\n"


TABLE_HEAD = """# The shipped runs on accelerators

Every flagfile of `experiments/configs/` compiled, without the hardware, for
{targets} (float32; the meta-training flagfiles also in bfloat16 on {bf16}) by
`python -m experiments.plan --fit` (BUILD.md, "Plan a run before you rent
it"). Only the training program of each run is compiled here (BPTT step, ES
generation or cloning step); `python -m experiments.plan --target=...` also
compiles the meta-test unroll.

- **GiB per device (of)**: arguments + outputs + temporaries + code of one
  device, from the compiler's memory analysis, and the chip's memory.
- **--fit chose**: for a run that does not fit as it is, the largest
  `--micro_batch` (BPTT; `--member_batch` for ES) that fits, or a
  `--remat_chunk`; the row then shows that setting. "—": it fits as it is.
- **kernels per while body (trips)**: launched ops (fusions, copies, custom
  calls, collectives, slices, dots, ...) in each `while` loop body of the
  optimised program, and how often the loop runs per step: the time loops
  (T, or T / chunk and chunk with `--remat_chunk`) dominate a step on an
  accelerator; the ES rows also hold the strategy's own loops (e.g. CMA-ES's
  eigendecomposition, trips unknown).
- **collectives (in loops)**: all-reduces/all-gathers per step, and how many
  sit inside a loop (a collective in a time loop would cross the network T
  times per episode). The meta-training programs have none in a loop. The
  cloning step has one: XLA all-reduces the V_M gradient inside the backward
  loop of its short unroll (`--unroll_steps` trips, 4 by default), which a
  sharded loss with one reduction after the loop would remove.
- **step time >=**: the lower bound, {formula}. XLA counts a loop body once, not once per
  trip, so this bound is loose; it is no estimate of the real step time,
  which only a run on the hardware measures. The GPU compiler reports no
  cost analysis.
- A row that says the batch does not split: the run's `--batch_size` (or
  `--popsize`) is not a multiple of the target's chips; change it to plan it.
- `*`: the run continues an earlier stage's workdir (`--init_checkpoint`),
  which is not shipped (or, in bfloat16, a float32 learner); it is planned
  from scratch with the flags' architecture.

"""


def main(argv):
    del argv
    from vsml_jax import accelerators
    from vsml_jax.runs import plan as planner
    if FLAGS.table_worker:
        return _table_worker()
    if FLAGS.table:
        return _write_table(FLAGS.table)
    if not FLAGS.target:
        raise app.UsageError("--target is required, e.g. --target=tpu-v5e-32 or "
                             "--target=gpu-h200.")
    try:
        target = accelerators.get(FLAGS.target)
    except accelerators.UnknownTargetError as e:
        raise app.UsageError(f"--target: {e}") from None
    try:
        report = planner.plan(_config(), target, fit=FLAGS.fit, programs=FLAGS.programs,
                              log=lambda line: print(line, file=sys.stderr, flush=True))
    except accelerators.PluginMissingError as e:
        raise app.UsageError(str(e)) from None
    print(report.text())
    if FLAGS.json:
        import json
        with open(FLAGS.json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
    if FLAGS.dump_hlo:
        for path in report.dump_hlo(FLAGS.dump_hlo):
            print(f"wrote {path}")
    message = planner.not_fitting_message(report)
    if message:
        sys.stderr.write(message + "\n")
        sys.exit(2)


if __name__ == "__main__":
    common.run(main, cluster_flags=False)
