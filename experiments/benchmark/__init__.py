r"""Speed and memory of the VS Meta RNN kernels on this machine.

    python -m experiments.benchmark                 # full run, writes benchmark.json
    python -m experiments.benchmark --quick --out=/tmp/b.json --markdown=/tmp/b.md

One process, one go. For the paper's 784 -> 10 LSTM layer (H=16, m=8, 2 micro
ticks) and a reduced 49 -> 10 one it measures:

* roofline: the machine's float32 matmul rate (2048 x 2048) and tanh rate (one
  big jnp.tanh, and tanh on cache-resident data), measured in the same run;
* forward unroll, batch 1 and a batch of 16 episodes (vmap), fast kernel
  (`grid`) and per-cell reference (`reference`): cell micro-ticks per second,
  FLOP rate as a fraction of the matmul rate, and the fraction of the
  physical limit (h @ W_h at the matmul rate + gate tanh at the tanh rate);
* ablations of the fast kernel's micro ticks (no tanh, no matmul, no tiling)
  to say which part limits the speed;
* BPTT meta-gradient step (4 episodes x T, vmap, grad of the mean loss):
  time, gradient / forward time ratio, fast vs reference;
* BPTT memory for T = 100, 500, 2000 with and without rematerialisation,
  from `jit(...).lower(...).compile().memory_analysis()` (no run needed);
* ES population evaluation, populations 16 and 64: vmap over the population,
  lax.map (one member after another, what meta-training uses on a CPU), and
  lax.map sharded over 2 and 8 CPU devices (shard_map over a Mesh, population
  axis sharded, data replicated), checking that results equal the vmap ones;
* scaling (`--sections=scaling`, not part of the default run): meta-training
  steps/s of the real training step (`gradient.make_step_fn` / BPTT with Adam,
  `evolution.make_step_fn` / OpenAI-ES) on 1, 2, 4, 8 CPU devices of one
  process and on 2 processes x 2 devices (jax.distributed on 127.0.0.1, gloo),
  each configuration in a fresh worker process (`--scaling_worker`), with the
  speed-up and efficiency per device against 1 device.

Timings exclude compilation and a warm-up call; each is the median of
`--repeats` calls, with min and max. FLOPs are counted per cell micro-tick of
an LSTM: 2*H*4H for h @ W_h, 4H for adding the message pre-activations and
12H for the gate arithmetic (sigmoid via tanh: (t+1)/2 per gate, c and h
updates, clip); transcendentals (4H gate tanh + H tanh(c)) are counted
separately. Per-neuron work (messages, read-out), O(A + B) per step, is not
counted. Other processes on the machine make timings noisy: the load average
is recorded before and after.

Layout: one module per section (`roofline`, `forward`, `ablation`, `bptt`
(also the memory section), `population`, `scaling`), `harness` (the scaling
section's worker processes), `report` (markdown tables, target checks),
`tools` (timing and problems shared by the sections) and `__main__` (flags).
"""
from experiments.benchmark.ablation import ablation
from experiments.benchmark.bptt import _chunk_for, bptt, bptt_memory
from experiments.benchmark.forward import forward
from experiments.benchmark.harness import finish_scaling_workers, start_scaling_workers
from experiments.benchmark.population import population
from experiments.benchmark.report import check_targets, to_markdown
from experiments.benchmark.roofline import roofline
from experiments.benchmark.scaling import scaling, scaling_markdown, scaling_worker
from experiments.benchmark.tools import (PAPER, REDUCED, lstm_work_per_cell_tick,
                                         machine_info, make_problem, time_calls)

__all__ = ["ablation", "bptt", "bptt_memory", "check_targets", "finish_scaling_workers",
           "forward", "lstm_work_per_cell_tick", "machine_info", "make_problem",
           "population", "roofline", "scaling", "scaling_markdown", "scaling_worker",
           "start_scaling_workers", "time_calls", "to_markdown", "PAPER", "REDUCED",
           "_chunk_for"]
