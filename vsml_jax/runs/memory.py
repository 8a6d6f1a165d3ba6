"""Does a run's training step fit in memory? Checked before the run starts.

XLA's memory analysis of the compiled step (arguments + outputs + temporaries,
per device) is compared with what the devices have: the machine's memory on
CPU (all virtual CPU devices share it), `memory_stats()["bytes_limit"]` on a
GPU/TPU. A step above it is refused with the estimate and the settings that
shrink it; above half of it a warning is logged. Compiling here costs no
extra time: jax.jit keeps the executable and the run's first step reuses it
(same function, shapes and shardings), measured in the tests.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

from absl import logging

from vsml_jax import hlo_stats
from vsml_jax.runs.common import SettingsError

WARN_FRACTION = 0.5


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def step_bytes(compiled) -> Optional[int]:
    """Peak bytes of one device's run of `compiled` (XLA's estimate), or None."""
    try:
        m = hlo_stats.memory(compiled, capacity=0)
    except Exception:  # not every backend implements it; then nothing is checked
        return None
    # The executable's code is not counted here (the planner's `needed` does).
    return max(0, m.needed - m.generated_code)


def available_bytes(devices) -> Tuple[Optional[Tuple[int, int]], str, int]:
    """((total, free now) bytes, what that memory is, devices sharing it); None: unknown.

    On CPU the local devices are threads of one process: they share the
    machine's memory, so the per-device estimate is multiplied by their number.
    """
    first = devices[0]
    if first.platform == "cpu":
        import psutil
        mem = psutil.virtual_memory()
        return (mem.total, mem.available), "this machine's memory", len(devices)
    try:
        limit = (first.memory_stats() or {}).get("bytes_limit")
    except Exception:  # memory_stats is not available on every platform
        limit = None
    return (limit, limit) if limit else None, f"the memory of one {first.device_kind}", 1


def remat_chunk_hint(episode_length: int) -> int:
    """The smallest divisor of the episode length >= its square root (k for --remat_chunk=k)."""
    for k in range(max(1, math.isqrt(episode_length)), episode_length + 1):
        if episode_length % k == 0:
            return k
    return episode_length


def check_fits(compiled, devices, fixes: str, warn: Callable[[str], Any] = logging.warning
               ) -> Optional[int]:
    """SettingsError if the compiled step cannot fit; a warning above half the memory.

    Args:
      compiled: a jax `Compiled` (from `jitted.lower(...).compile()`).
      devices: the local devices it runs on.
      fixes: the settings that shrink it, e.g. "--micro_batch=2, ...".
    Returns: the estimated bytes (all local devices together), or None when
      the backend gives no estimate or no limit.
    """
    per_device = step_bytes(compiled)
    memory, what, sharing = available_bytes(list(devices))
    if per_device is None or not memory:
        return None
    total, free = memory
    need = per_device * sharing
    where = f" ({sharing} devices x {gib(per_device)})" if sharing > 1 else ""
    free_now = f" ({gib(free)} of it free now)" if free < total else ""
    # Above what is free now (other programs hold the rest) the run would be
    # killed by the system's out-of-memory killer or swap, often after minutes.
    if need > free:
        raise SettingsError(
            f"The training step needs about {gib(need)}{where} (XLA's estimate) but "
            f"{what} is {gib(total)}{free_now}: the run would fail or swap. Shrink it: "
            f"{fixes}.")
    if need > WARN_FRACTION * total:
        warn(f"The training step needs about {gib(need)}{where} of {gib(total)} "
             f"({what}, {100 * need / total:.0f}%); if the run fails for memory: {fixes}.")
    return need


def compile_program(program, init_fn: Callable[[], Any]):
    """Compiles a StepProgram for the state `init_fn` makes, placed as the training loop places it.

    The state and data specs carry the replicated sharding of `program.mesh`
    (the loop keeps the state replicated there), so the run's first step
    finds this executable in jax.jit's cache instead of compiling again.
    """
    import jax
    state = jax.eval_shape(init_fn)
    sharding = program.data_sharding()

    def spec(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding,
                                    weak_type=getattr(x, "weak_type", False))
    data = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), program.data)
    return program.jitted.lower(jax.tree_util.tree_map(spec, state), data).compile()
