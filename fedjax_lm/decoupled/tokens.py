"""Islands of different sizes and the token-weighted merge (Decoupled DiLoCo, arXiv 2604.21428).

Decoupled islands need not be alike: island k may run on its own number of devices
(``islands.devices``, e.g. ``"2,1"``) with its own rows per step (``islands.batch_sizes``, e.g.
``"16,8"``; each a multiple of that island's devices). With ``outer.merge=tokens`` the syncer
merges a round's pseudo-gradients weighted by the tokens each island processed for it,

    delta_p = sum_k w_k delta_k,p / sum_k w_k,   w_k = batch_k x seq_len x H,

over the islands that sent (absent and refused islands weigh 0); ``mean`` (the default) is
DiLoCo's unweighted mean. The weights come from the run's config, which the syncer and every
island share (the join fingerprint), never from what an island claims: an island cannot
inflate its own say. With equal islands the two rules are the same mean, which is why the
mesh-axis mode (its islands are alike by construction) has nothing to weigh.

Pure Python: the config validation imports it.
"""

from __future__ import annotations

MERGES = ("mean", "tokens")


def _ints(text: str, key: str) -> list[int]:
  try:
    values = [int(v) for v in str(text).split(",")]
  except ValueError:
    raise ValueError(f"{key}={text!r}: expected positive integers, comma-separated") from None
  if any(v < 1 for v in values):
    raise ValueError(f"{key}={text!r}: every entry must be >= 1")
  return values


def _parts(config) -> int:
  return int(config.islands.max_num) or int(config.islands.num)


def batch_sizes(config) -> list[int]:
  """Rows per step of each island (data partition) k."""
  parts = _parts(config)
  if not config.islands.batch_sizes:
    return [int(config.data.batch_size)] * parts
  values = _ints(config.islands.batch_sizes, "islands.batch_sizes")
  if len(values) != parts:
    raise ValueError(f"islands.batch_sizes={config.islands.batch_sizes!r}: {len(values)} "
                     f"entries, expected one per island ({parts}: islands.max_num or "
                     "islands.num)")
  return values


def devices(config) -> list[int] | None:
  """Devices of each island job k (None: each as launched)."""
  if not config.islands.devices:
    return None
  values = _ints(config.islands.devices, "islands.devices")
  if len(values) != _parts(config):
    raise ValueError(f"islands.devices={config.islands.devices!r}: {len(values)} entries, "
                     f"expected one per island ({_parts(config)})")
  return values


def weights(config) -> list[float] | None:
  """The merge weight of each island: tokens processed per round (None: the plain mean)."""
  if config.outer.merge != "tokens":
    return None
  per_row = int(config.data.seq_len) * int(config.outer.sync_every)
  return [float(b * per_row) for b in batch_sizes(config)]


def alike(config) -> bool:
  """Every island the same size (the mesh-axis mode's only case)."""
  sizes = batch_sizes(config)
  counts = devices(config)
  return len(set(sizes)) == 1 and (counts is None or len(set(counts)) == 1)


def validate(config) -> None:
  """One clear error naming the first bad value."""
  if config.outer.merge not in MERGES:
    raise ValueError(f"outer.merge={config.outer.merge!r}: expected one of {MERGES}")
  sizes, counts = batch_sizes(config), devices(config)
  if not alike(config) and config.launch.mode != "decoupled":
    raise ValueError(f"islands.batch_sizes={config.islands.batch_sizes!r} / islands.devices="
                     f"{config.islands.devices!r}: islands of different sizes need "
                     "launch.mode=decoupled (the mesh-axis mode's islands share one mesh)")
  if counts is not None:
    for k, (b, d) in enumerate(zip(sizes, counts)):
      if b % d:
        raise ValueError(f"island {k}: {b} rows per step (islands.batch_sizes) is not a "
                         f"multiple of its {d} devices (islands.devices)")
    if len(set(counts)) > 1 and config.outer.compression != "none":
      raise ValueError(f"islands.devices={config.islands.devices!r} differ and "
                       f"outer.compression={config.outer.compression!r}: a codec lays its "
                       "blocks out per device, so islands with different device counts would "
                       "send different layouts (use outer.compression=none or equal counts)")
  if config.outer.merge == "tokens" and config.outer.policy != "sync":
    raise ValueError("outer.merge=tokens needs outer.policy=sync (async applies each island's "
                     "update alone, on arrival: there is no round to weigh)")
