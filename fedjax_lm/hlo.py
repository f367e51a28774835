"""Reading collectives out of compiled HLO: which device groups talk, and how many bytes.

Used to check the island invariant (inner steps never talk across islands) and to cross-check
the analytic ``island_bytes`` against what XLA actually emits.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

_OPS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1,
                "pred": 1, "s64": 8, "u64": 8, "s16": 2, "u16": 2, "s4": 0.5, "u4": 0.5,
                "f8e4m3fn": 1, "f8e5m2": 1}
_LINE = re.compile(r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>" + "|".join(_OPS) +
                   r")(?:-start)?\(")
_START = re.compile(r"^\s*(ROOT\s+)?%\S+\s*=|^\S|^\s*}")
_ARRAY = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
  op: str
  groups: tuple[tuple[int, ...], ...]  # logical device ids that exchange data
  result_bytes: int  # per device

  @property
  def operand_bytes(self) -> float:
    """Bytes each device contributes (what it sends into the collective)."""
    size = max(len(g) for g in self.groups) if self.groups else 1
    if self.op == "all-gather":
      return self.result_bytes / size
    if self.op == "reduce-scatter":
      return self.result_bytes * size
    return self.result_bytes


def _shape_bytes(shape: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += n * _DTYPE_BYTES.get(dtype, 4)
  return int(total)


def _iota(dims: str, perm: str | None) -> np.ndarray:
  shape = [int(d) for d in dims.split(",")]
  ids = np.arange(math.prod(shape)).reshape(shape)
  return ids.transpose([int(p) for p in perm.split(",")]) if perm else ids


def _parse_mesh_groups(line: str, num_devices: int):
  """``replica_groups=mesh['axis_0'=A,...], device_ids=([..]T(..)) {'axis_k',...}``: devices
  laid out on the named mesh; each group varies only along the listed axes."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]", line)
  if not m:
    return None
  axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
  names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
  d = re.search(r"device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\)", line)
  ids = _iota(d.group(1), d.group(2)).reshape(-1) if d else np.arange(num_devices)
  ids = ids.reshape(sizes)
  after = line[m.end():]
  g = re.search(r"\{([^}]*)\}", after)
  group_axes = [names.index(a) for a in re.findall(r"'([^']+)'", g.group(1))] if g else []
  rest = [i for i in range(len(names)) if i not in group_axes]
  size = math.prod(sizes[i] for i in group_axes)
  rows = ids.transpose(rest + group_axes).reshape(-1, size)
  return tuple(tuple(int(x) for x in row) for row in rows)


def _parse_groups(line: str, num_devices: int) -> tuple[tuple[int, ...], ...]:
  groups = _parse_mesh_groups(line, num_devices)
  if groups is not None:
    return groups
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
  if m:  # iota form: arange(prod(dims)).reshape(dims).transpose(perm).reshape(G, S)
    g, s = int(m.group(1)), int(m.group(2))
    ids = _iota(m.group(3), m.group(4))
    return tuple(tuple(int(x) for x in row) for row in ids.reshape(g, s))
  m = re.search(r"replica_groups=\{(.*?)\}\s*(?:,|$)", line)
  if m and m.group(1).strip():
    return tuple(tuple(int(x) for x in grp.split(",") if x.strip())
                 for grp in re.findall(r"\{([\d,\s]*)\}", "{" + m.group(1) + "}"))
  m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
  if m:  # every (source, target) pair
    return tuple(tuple(int(x) for x in p.split(",")) for p in re.findall(r"\{(\d+,\d+)\}",
                                                                           m.group(1)))
  return (tuple(range(num_devices)),)  # empty replica_groups: everyone


def _instructions(hlo_text: str) -> list[str]:
  """One string per HLO instruction (the printer wraps long ones over several lines)."""
  lines: list[str] = []
  for raw in hlo_text.splitlines():
    if _START.match(raw) or not lines:
      lines.append(raw)
    else:
      lines[-1] += " " + raw.strip()
  return lines


def collectives(hlo_text: str, num_devices: int) -> list[Collective]:
  """All collectives in an HLO module's text (async ``-start`` forms included once)."""
  out = []
  for line in _instructions(hlo_text):
    m = _LINE.search(line)
    if not m or "-done" in line.split("=")[0]:
      continue
    shape = m.group("shape")
    if line[m.end("op"):].startswith("-start") and shape.startswith("("):
      shape = shape[1:-1].split("),")[0]  # async start returns (operand, result, ...)
    out.append(Collective(m.group("op"), _parse_groups(line, num_devices), _shape_bytes(shape)))
  return out


def cross_island(colls: list[Collective], devices_per_island: int) -> list[Collective]:
  """Collectives with a group spanning two islands (island = id // devices_per_island, as the
  ``island`` mesh axis is outermost)."""
  return [c for c in colls
          if any(len({d // devices_per_island for d in g}) > 1 for g in c.groups)]


def island_payload_bytes(colls: list[Collective], devices_per_island: int) -> float:
  """Bytes one island contributes to cross-island collectives: per-device operand bytes times
  the island's devices (every device of an island takes part in each such collective)."""
  return sum(c.operand_bytes for c in cross_island(colls, devices_per_island)) * devices_per_island
