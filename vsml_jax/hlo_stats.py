"""What a compiled program looks like on its target, read from its optimised HLO text.

    text = compiled.as_text()
    loops = while_loops(text)          # [Loop(body, trip_count, kernels, kinds)]
    colls = collectives(text)          # [Collective(kind, bytes, in_loop)]
    mem = memory(compiled, capacity)   # Memory(arguments, outputs, temporaries, ...)

Kernels: the launched ops of a `while` body (each body runs once per time
step, or per chunk of steps), i.e. its fusions, copies, custom calls,
collectives, dynamic(-update)-slices, sorts, gathers, scatters, reduces, dots
and convolutions; tuple plumbing, bitcasts, constants, parameters and scalar
loop-counter arithmetic are not counted. Only the ops written directly in the
body count (a nested loop is counted as its own body), so the numbers match
a per-body count of the same HLO text by any tool that uses this definition.

The step-time lower bound is max(FLOPs / peak FLOP/s, bytes accessed / HBM
bytes/s), per device, from the compiler's cost analysis (TPU only: the GPU
compiler reports none). XLA's cost analysis counts a loop body once, not
once per iteration, so the bound stays a bound (the real count is larger)
but a loose one for programs whose work sits in long loops.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Optional, Sequence

# Launched ops (HLO opcodes) counted as kernels.
KERNEL_OPS = frozenset({
    "fusion", "custom-call", "copy", "copy-start", "dynamic-slice", "dynamic-update-slice",
    "sort", "gather", "scatter", "reduce", "convolution", "dot",
    "all-reduce", "all-reduce-start", "all-gather", "all-gather-start", "reduce-scatter",
    "collective-permute", "collective-permute-start", "all-to-all"})
# Collective opcodes; the "-start" half of an async pair is the one counted.
COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                  "all-to-all", "collective-broadcast", "ragged-all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}

_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_OPCODE = re.compile(r"= \S+ (\w[\w\-]*)\(")
_WHILE = re.compile(r"while\(.*condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition|branch_computations|"
                     r"called_computations)=\{?%?([\w.\-]+(?:, ?%?[\w.\-]+)*)\}?")


@dataclasses.dataclass
class Loop:
    """One `while` loop: its body computation, trip count (None if unknown), kernels."""
    body: str
    trip_count: Optional[int]
    kernels: int
    kinds: Dict[str, int]


@dataclasses.dataclass
class Collective:
    """One collective op: kind, bytes of its result per device, inside a loop body?"""
    kind: str
    bytes: int
    in_loop: bool


def computations(text: str) -> Dict[str, List[str]]:
    """Computation name -> its instruction lines (top-level computations only)."""
    comps: Dict[str, List[str]] = {}
    current = None
    for line in text.split("\n"):
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(1)
            comps[current] = []
        elif current is not None:
            comps[current].append(line)
    return comps


def _opcode(line: str) -> Optional[str]:
    m = _OPCODE.search(line)
    if m:
        return m.group(1)
    # A tuple result, "= (f32[..]{..}, f32[..]{..}) opcode(": multi-output fusions
    # and custom calls. Skip the balanced parentheses of the shape.
    start = line.find("= (")
    if start < 0:
        return None
    depth, i = 0, start + 2
    for i in range(start + 2, len(line)):
        depth += {"(": 1, ")": -1}.get(line[i], 0)
        if depth == 0:
            break
    m = re.match(r" (\w[\w\-]*)\(", line[i + 1:])
    return m.group(1) if m else None


def _trip_count(line: str, comps: Dict[str, List[str]], condition: str) -> Optional[int]:
    """The compiler's recorded trip count, else the bound of `i < N` in the condition."""
    m = (re.search(r"known_trip_count=\{n=(\d+)", line)
         or re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
         or re.search(r'"n":"(\d+)"', line))
    if m:
        return int(m.group(1))
    cond = comps.get(condition, [])
    consts = [int(c) for l in cond for c in re.findall(r"s32\[\]\S* constant\((\d+)\)", l)]
    if len(consts) == 1 and any("direction=LT" in l for l in cond):
        return consts[0]
    return None


def while_loops(text: str) -> List[Loop]:
    """Every `while` loop of the HLO module, in text order, with its kernel count."""
    comps = computations(text)
    out = []
    for line in text.split("\n"):
        m = _WHILE.search(line)
        if not m:
            continue
        condition, body = m.group(1), m.group(2)
        kinds: Dict[str, int] = {}
        for instr in comps.get(body, []):
            op = _opcode(instr)
            if op:
                kinds[op] = kinds.get(op, 0) + 1
        launched = {k: v for k, v in kinds.items() if k in KERNEL_OPS}
        out.append(Loop(body, _trip_count(line, comps, condition), sum(launched.values()),
                        launched))
    return out


def _loop_computations(text: str, comps: Dict[str, List[str]]) -> set:
    """Names of the computations that run inside some loop (bodies and what they call)."""
    inside, todo = set(), [m.group(2) for m in _WHILE.finditer(text)]
    todo += [m.group(1) for m in _WHILE.finditer(text)]
    while todo:
        name = todo.pop()
        if name in inside:
            continue
        inside.add(name)
        for line in comps.get(name, []):
            for m in _CALLED.finditer(line):
                todo += [n.strip().lstrip("%") for n in m.group(1).split(",")]
    return inside


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string such as "f32[16,64]{1,0}" or a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", shape):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def collectives(text: str) -> List[Collective]:
    """Every collective of the module (an async start/done pair counts once)."""
    comps = computations(text)
    inside = _loop_computations(text, comps)
    out = []
    pattern = re.compile(r"= (.*?) (" + "|".join(COLLECTIVE_OPS) + r")(-start)?\(")
    for name, lines in comps.items():
        for line in lines:
            # Not _opcode: a collective over several arrays has a tuple shape with spaces.
            m = pattern.search(line)
            if m:
                out.append(Collective(m.group(2), shape_bytes(m.group(1)), name in inside))
    return out


def summarize_collectives(colls: Sequence[Collective]) -> Dict[str, Any]:
    """{"count", "in_loops", "bytes", "by_kind": {kind: {"count", "bytes", "in_loops"}}}."""
    by_kind: Dict[str, Dict[str, int]] = {}
    for c in colls:
        k = by_kind.setdefault(c.kind, {"count": 0, "bytes": 0, "in_loops": 0})
        k["count"] += 1
        k["bytes"] += c.bytes
        k["in_loops"] += int(c.in_loop)
    return {"count": len(colls), "in_loops": sum(c.in_loop for c in colls),
            "bytes": sum(c.bytes for c in colls), "by_kind": by_kind}


@dataclasses.dataclass
class Memory:
    """Per-device memory of a compiled program (bytes), from `memory_analysis()`.

    needed = arguments + outputs + temporaries + generated code - aliased
    (outputs that reuse donated argument buffers are not counted twice).
    """
    arguments: int
    outputs: int
    temporaries: int
    generated_code: int
    aliased: int
    capacity: int

    @property
    def needed(self) -> int:
        return (self.arguments + self.outputs + self.temporaries + self.generated_code
                - self.aliased)

    @property
    def fits(self) -> bool:
        return self.needed <= self.capacity

    @property
    def margin(self) -> int:
        """capacity - needed (negative: does not fit)."""
        return self.capacity - self.needed


def memory(compiled: Any, capacity: int) -> Memory:
    """The Memory of a `jax.stages.Compiled` on a device with `capacity` bytes."""
    m = compiled.memory_analysis()
    return Memory(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                  int(m.temp_size_in_bytes), int(m.generated_code_size_in_bytes),
                  int(m.alias_size_in_bytes), int(capacity))


def cost(compiled: Any) -> Optional[Dict[str, float]]:
    """{"flops", "bytes_accessed", "transcendentals"} per device, or None where the
    compiler reports no cost analysis (GPU)."""
    try:
        c = compiled.cost_analysis()
    except Exception:  # some backends raise instead of returning None
        return None
    if isinstance(c, (list, tuple)):
        c = c[0] if c else None
    if not c or "flops" not in c:
        return None
    return {"flops": float(c.get("flops", 0.0)),
            "bytes_accessed": float(c.get("bytes accessed", 0.0)),
            "transcendentals": float(c.get("transcendentals", 0.0))}


LOWER_BOUND_FORMULA = ("step time >= max(FLOPs / peak bf16 FLOP/s, bytes accessed / HBM "
                       "bytes/s), per device, FLOPs and bytes from XLA's cost analysis")


def step_time_lower_bound(costs: Optional[Dict[str, float]], peak_flops: float,
                          bandwidth: float) -> Optional[float]:
    """Seconds: max(flops / peak_flops, bytes_accessed / bandwidth), or None without costs.

    A bound, not an estimate: launch latency, collectives' network time and
    anything the compiler's count leaves out only add to it.
    """
    if costs is None:
        return None
    return max(costs["flops"] / peak_flops, costs["bytes_accessed"] / bandwidth)
