"""The accelerators a run can be planned for, in one table, and their abstract devices.

    target = accelerators.get("tpu-v5e-32")       # Target: chips, HBM, peaks, topology
    devices = accelerators.abstract_devices(target)  # 32 TPU v5 lite devices, no hardware

Names follow Cloud TPU's accelerator types: `tpu-v4-N` and `tpu-v5p-N` count
TensorCores (two per chip, one "megacore" device per chip: v4-8 = 4 chips),
`tpu-v5e-N` and `tpu-v6e-N` count chips (v5e-8 = 8 chips). NVIDIA GPUs are
`gpu-h100`, `gpu-h200`, `gpu-a100`, with `xK` for K GPUs of one host
(`gpu-h200x8`); JAX's deviceless GPU topology covers one host here, so
several GPU hosts are not offered.

The per-chip numbers are the vendors' published specifications (dense,
no sparsity). `peak_flops` is the bfloat16 matrix peak; it is what the
step-time lower bound divides by, because XLA runs float32 matmuls on the
same units by default (bf16 passes on TPU, TF32 on NVIDIA), so no program
can beat it. `peak_flops_f32` is the vector (non-matrix) float32 peak, for
reference.

`abstract_devices` must run in a process whose JAX backend is the CPU (the
planner sets `JAX_PLATFORMS=cpu` and the plugin variables first,
`prepare_environment`); it imports libtpu or the CUDA plugin only then, so
nothing else in the package ever loads them.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Optional, Tuple

GiB = 1 << 30


class UnknownTargetError(ValueError):
    """A target name that is not in the table (the message lists the known ones)."""


class PluginMissingError(RuntimeError):
    """The compiler plugin of a target is not installed (the message names the pip extra)."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip (one JAX device).

    Attributes:
      kind: "tpu" or "gpu".
      generation: "v4", "v5e", "v5p", "v6e", "h100", "h200", "a100".
      hbm_bytes: device memory per chip.
      peak_flops: bfloat16 dense matrix FLOP/s per chip.
      peak_flops_f32: float32 vector FLOP/s per chip (None where not published).
      hbm_bandwidth: device memory bytes/s per chip.
      megacore: two TensorCores fused into one device (v4, v5p).
      chips_per_host: chips of one host of a multi-host slice (or GPUs of one host).
      topology_prefix: libtpu's name of the generation ("v5e" in "v5e:4x8").
      gpu_target_config: the GpuTargetConfig text proto (GPUs only).
    """
    kind: str
    generation: str
    hbm_bytes: int
    peak_flops: float
    peak_flops_f32: Optional[float]
    hbm_bandwidth: float
    megacore: bool = False
    chips_per_host: int = 4
    topology_prefix: str = ""
    gpu_target_config: str = ""


def _gpu_proto(name: str, cores: int, fpus: int, bandwidth: int, memory: int, l2: int,
               clock: float, smem_core: int, smem_optin: int, major: int) -> str:
    """A GpuTargetConfig text proto: what XLA's GPU compiler needs to know of a device."""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {smem_core}
  threads_per_core_limit: 2048
  core_count: {cores}
  fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock}
  device_memory_size: {memory}
  shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{ major: {major} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{name}"
"""


# ---------------------------------------------------------------- the table
CHIPS = {
    # Cloud TPU system architecture pages: HBM, peak bf16, HBM bandwidth per chip.
    "v4": Chip("tpu", "v4", 32 * GiB, 275e12, None, 1228e9, megacore=True,
               chips_per_host=4, topology_prefix="v4"),
    "v5e": Chip("tpu", "v5e", 16 * GiB, 197e12, None, 819e9, chips_per_host=4,
                topology_prefix="v5e"),
    "v5p": Chip("tpu", "v5p", 95 * GiB, 459e12, None, 2765e9, megacore=True,
                chips_per_host=4, topology_prefix="v5p"),
    "v6e": Chip("tpu", "v6e", 32 * GiB, 918e12, None, 1640e9, chips_per_host=4,
                topology_prefix="v6e"),
    # NVIDIA data sheets (SXM parts); memory sizes as the devices report them.
    "h100": Chip("gpu", "h100", 84978434048, 989e12, 67e12, 3.35e12, chips_per_host=8,
                 gpu_target_config=_gpu_proto("NVIDIA H100 80GB HBM3", 132, 128,
                                              3352320000000, 84978434048, 52428800, 1.98,
                                              233472, 232448, 9)),
    "h200": Chip("gpu", "h200", 150754820096, 989e12, 67e12, 4.8e12, chips_per_host=8,
                 gpu_target_config=_gpu_proto("NVIDIA H200", 132, 128, 4800000000000,
                                              150754820096, 52428800, 1.98, 233472,
                                              232448, 9)),
    "a100": Chip("gpu", "a100", 85100068864, 312e12, 19.5e12, 2.039e12, chips_per_host=8,
                 gpu_target_config=_gpu_proto("NVIDIA A100-SXM4-80GB", 108, 64,
                                              2039040000000, 85100068864, 41943040, 1.41,
                                              167936, 166912, 8)),
}

# Slice shapes (chips) by chip count: 2-D for v5e/v6e, 3-D for v4/v5p.
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
              2048: (8, 16, 16), 4096: (16, 16, 16)}
GPU_COUNTS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Target:
    """A slice of chips to plan for.

    Attributes:
      name: "tpu-v5e-32", "gpu-h200x8", ...
      chip: the Chip.
      num_devices: JAX devices (chips; one per megacore chip).
      shape: the slice's chip grid, e.g. (4, 8) or (4, 4, 8); GPUs (1, 1, K).
      hosts: hosts of the slice.
    """
    name: str
    chip: Chip
    num_devices: int
    shape: Tuple[int, ...]
    hosts: int

    @property
    def topology_name(self) -> str:
        """libtpu's topology name ("v5e:4x8") or the GPU topology ("1x1x8")."""
        dims = "x".join(map(str, self.shape))
        return f"{self.chip.topology_prefix}:{dims}" if self.chip.kind == "tpu" else dims

    @property
    def capacity_bytes(self) -> int:
        return self.chip.hbm_bytes

    def describe(self) -> str:
        c = self.chip
        return (f"{self.name}: {self.num_devices} x {c.generation} "
                f"({self.topology_name}, {self.hosts} host{'s' * (self.hosts > 1)}), "
                f"{c.hbm_bytes / GiB:.1f} GiB HBM, {c.peak_flops / 1e12:.0f} TFLOP/s bf16, "
                f"{c.hbm_bandwidth / 1e9:.0f} GB/s per chip")


def _tpu_targets():
    for gen in ("v4", "v5p"):
        for chips, shape in _SHAPES_3D.items():
            yield f"tpu-{gen}-{2 * chips}", gen, chips, shape
    for gen in ("v5e", "v6e"):
        for chips, shape in _SHAPES_2D.items():
            yield f"tpu-{gen}-{chips}", gen, chips, shape


def known_targets() -> Tuple[str, ...]:
    """Every target name, TPUs then GPUs."""
    names = [n for n, *_ in _tpu_targets()]
    for gen in ("h100", "h200", "a100"):
        names += [f"gpu-{gen}"] + [f"gpu-{gen}x{k}" for k in GPU_COUNTS[1:]]
    return tuple(names)


def get(name: str) -> Target:
    """The Target called `name`; UnknownTargetError (listing the known ones) otherwise."""
    for tname, gen, chips, shape in _tpu_targets():
        if tname == name:
            chip = CHIPS[gen]
            # v5e/v6e hosts hold up to 8 chips when the slice is one host; v4/v5p 4.
            one_host = chips <= (4 if chip.megacore else 8)
            return Target(name, chip, chips, shape,
                          1 if one_host else chips // chip.chips_per_host)
    m = re.fullmatch(r"gpu-(h100|h200|a100)(?:x(\d+))?", name)
    if m and int(m.group(2) or 1) in GPU_COUNTS:
        k = int(m.group(2) or 1)
        return Target(name, CHIPS[m.group(1)], k, (1, 1, k), 1)
    names = known_targets()
    tpus = sorted({re.sub(r"-\d+$", "-N", n) for n in names if n.startswith("tpu")})
    raise UnknownTargetError(
        f"unknown target {name!r}. Known: TPU slices {', '.join(tpus)} with N in "
        f"{{{', '.join(n.split('-')[-1] for n in names if n.startswith('tpu-v5e'))}}} "
        f"(v5e, v6e: chips) or {{{', '.join(n.split('-')[-1] for n in names if n.startswith('tpu-v4'))}}} "
        f"(v4, v5p: TensorCores = 2 x chips); GPUs gpu-h100, gpu-h200, gpu-a100, "
        f"each with x2, x4 or x8 (GPUs of one host), e.g. gpu-h200x8.")


def _chips_per_host_bounds(target: Target) -> Tuple[int, int, int]:
    """libtpu's host shape: single-host slices of up to 8 chips are one host,
    larger ones have 4 chips (2x2x1) per host, as Cloud TPU builds them."""
    if target.hosts == 1:
        s = tuple(target.shape) + (1,) * (3 - len(target.shape))
        return s[0], s[1], s[2]
    return 2, 2, 1


def prepare_environment(kind: str) -> None:
    """Environment for a deviceless compile; must run before JAX starts a backend.

    JAX runs on the CPU (nothing is executed on the target); libtpu is told not
    to query a metadata server; the CUDA plugin is told not to check a driver.
    """
    os.environ["JAX_PLATFORMS"] = "cpu"
    # An installed CUDA plugin is initialised even for a CPU backend; without a
    # driver its version check would print a traceback.
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
    if kind == "tpu":
        os.environ["TPU_SKIP_MDS_QUERY"] = "1"
        # No TPU is opened, so several planners (or tests) may load libtpu at once.
        os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
        # Silence libtpu's warnings about a missing TPU VM description.
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_WORKER_ID", "0")
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
        os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"


def _backend_platforms() -> Tuple[str, ...]:
    from jax._src import xla_bridge
    return tuple(getattr(xla_bridge, "_backends", {}) or ())


def abstract_devices(target: Target):
    """The target's devices without the hardware (for `Mesh` and ahead-of-time compile).

    Raises PluginMissingError (naming the pip extra) if libtpu / the CUDA
    plugin is missing, RuntimeError if a non-CPU JAX backend already started.
    """
    prepare_environment(target.chip.kind)
    started = [p for p in _backend_platforms() if p != "cpu"]
    if started:
        raise RuntimeError(f"a {started[0]} JAX backend already runs in this process; "
                           "plan in a fresh process (python -m experiments.plan).")
    from jax.experimental import topologies
    if target.chip.kind == "tpu":
        try:
            import libtpu  # noqa: F401  (the TPU compiler)
        except ImportError:
            raise PluginMissingError(
                "planning for a TPU needs the TPU compiler (libtpu): pip install "
                "-e '.[tpu-aot]' (or pip install 'jax[tpu]').") from None
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=target.topology_name,
            chip_config_name="megacore" if target.chip.megacore else "default",
            chips_per_host_bounds=_chips_per_host_bounds(target), num_slices=1)
    else:
        if not _cuda_plugin_installed():
            raise PluginMissingError(
                "planning for an NVIDIA GPU needs the CUDA plugin: pip install "
                "-e '.[gpu-aot]' (or pip install 'jax[cuda13]').")
        desc = topologies.get_topology_desc(
            platform="cuda", target_config=target.chip.gpu_target_config,
            topology=target.topology_name)
    devices = list(desc.devices)
    if len(devices) != target.num_devices:
        raise RuntimeError(f"{target.name}: the compiler gave {len(devices)} devices, "
                           f"expected {target.num_devices}.")
    return devices


def _cuda_plugin_installed() -> bool:
    import importlib.util
    return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None
               for v in (13, 12))


def cuda_plugin_installed() -> bool:
    """Whether JAX's CUDA plugin is importable (GPU targets can be planned)."""
    try:
        return _cuda_plugin_installed()
    except ModuleNotFoundError:
        return False
