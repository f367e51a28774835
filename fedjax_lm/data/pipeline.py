"""Grain pipelines for language modeling: sources, partitions, train and eval.

Sources are random-access sequences of records (``tfds.data_source``); a record
is a dict whose ``text_key`` entry (default ``"text"``) is ``str`` or UTF-8
``bytes`` (bare ``str`` / ``bytes`` records also work).

Example selection for one process: ``partition_indices`` picks the examples of
island ``part_index`` of ``part_count``; the process then takes every
``shard_count``-th of them starting at ``shard_index`` (training) or a
contiguous slice (eval, which keeps neighbouring speeches together).

Packing: each example is tokenized (optionally followed by EOS), the token
streams are concatenated and cut into rows of ``seq_len + 1`` tokens;
``inputs = row[:-1]``, ``targets = row[1:]``. Training rows never contain
padding (grain's ``ConcatThenSplitIterDataset`` on an infinite stream); eval
pads the final row and batch, with ``mask = 0`` there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from fedjax_lm.data import shakespeare as shakespeare_lib
from fedjax_lm.data import tokenizers

PARTITIONS = ("iid", "by_play", "by_genre")


class DatasetUnavailableError(FileNotFoundError):
  """A dataset is not prepared (in a random-access format) in a data_dir."""


# ---------------------------------------------------------------- sources ---


def get_source(name: str, split: str, data_dir: str | None = None):
  """Returns a TF-free random-access source for ``name`` / ``split``.

  ``"shakespeare"`` is the vendored plays dataset, built into ``data_dir`` on
  demand. Any other name is read from the TFDS catalog layout in ``data_dir``
  with ``tfds.data_source`` (no download: it must already be prepared with
  ``file_format="array_record"`` or ``"parquet"``).

  Raises:
    DatasetUnavailableError: naming the dataset, split and data_dir.
  """
  data_dir = os.path.expanduser(data_dir or shakespeare_lib.default_data_dir())
  if name == "shakespeare":
    return shakespeare_lib.prepare_shakespeare(data_dir, split=split)
  if not os.path.isdir(data_dir):
    raise DatasetUnavailableError(
        f"Cannot read dataset {name!r} (split {split!r}): data_dir "
        f"{data_dir!r} does not exist."
    )
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises many types; report one clear error.
    cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise DatasetUnavailableError(
        f"Cannot read dataset {name!r} (split {split!r}) from data_dir "
        f"{data_dir!r}: {cause} It must be prepared there in array_record "
        "(or parquet) format, e.g. tfds.builder(name, data_dir=..., "
        "file_format='array_record').download_and_prepare()."
    ) from None


# ------------------------------------------------------------- partitions ---


@dataclasses.dataclass(frozen=True)
class ExampleMetadata:
  """Per-example facts for partitioning (``play``/``genre`` may be None)."""

  num_bytes: np.ndarray  # int64[n]: UTF-8 length of the text.
  play: np.ndarray | None  # str[n]
  genre: np.ndarray | None  # str[n]

  def __len__(self) -> int:
    return len(self.num_bytes)


def _text_of(record, text_key: str):
  """The text (str or bytes) of a record."""
  if isinstance(record, (str, bytes)):
    return record
  try:
    return record[text_key]
  except (KeyError, TypeError, IndexError):
    keys = list(record) if isinstance(record, Mapping) else type(record)
    raise KeyError(f"Record has no text field {text_key!r}: {keys}") from None


def _str_array(values) -> np.ndarray:
  return np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in values])


def example_metadata(
    source: Sequence[Any], text_key: str = "text", chunk: int = 4096
) -> ExampleMetadata:
  """Reads every record once (batched) to collect ``ExampleMetadata``."""
  num_bytes, plays, genres = [], [], []
  has_groups = True
  for start in range(0, len(source), chunk):
    idx = list(range(start, min(start + chunk, len(source))))
    getitems = getattr(source, "__getitems__", None)
    records = getitems(idx) if getitems else [source[i] for i in idx]
    for r in records:
      text = _text_of(r, text_key)
      num_bytes.append(len(text.encode("utf-8") if isinstance(text, str) else text))
      if has_groups and isinstance(r, Mapping) and "play" in r and "genre" in r:
        plays.append(r["play"])
        genres.append(r["genre"])
      else:
        has_groups = False
  return ExampleMetadata(
      num_bytes=np.asarray(num_bytes, np.int64),
      play=_str_array(plays) if has_groups else None,
      genre=_str_array(genres) if has_groups else None,
  )


_METADATA_CACHE: dict[tuple[int, str], tuple[Any, ExampleMetadata]] = {}


def _cached_metadata(source, text_key: str) -> ExampleMetadata:
  """``example_metadata`` memoized per live source object."""
  key = (id(source), text_key)
  ref, meta = _METADATA_CACHE.get(key, (None, None))
  if ref is None or ref() is not source:
    meta = example_metadata(source, text_key)
    try:
      ref = weakref.ref(source, lambda _, k=key: _METADATA_CACHE.pop(k, None))
    except TypeError:  # Not weak-referenceable: do not cache.
      return meta
    _METADATA_CACHE[key] = (ref, meta)
  return meta


def _check_index(what: str, index: int, count: int) -> None:
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"Need 0 <= {what}_index < {what}_count; got {index}, {count}.")


def _balanced_assignment(sizes: Mapping[str, int], part_count: int) -> dict[str, int]:
  """Greedy largest-first: each group goes to the part with fewest bytes."""
  loads = np.zeros(part_count, np.int64)
  out = {}
  for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
    part = int(np.argmin(loads))  # Lowest index among ties.
    out[name] = part
    loads[part] += sizes[name]
  return out


def partition_indices(
    source_or_metadata,
    partition: str,
    part_index: int,
    part_count: int,
    seed: int = 0,
    text_key: str = "text",
) -> np.ndarray:
  """Sorted example indices of part ``part_index`` of ``part_count``.

  * ``iid``: a seeded random permutation cut into ``part_count`` near-equal
    disjoint shards.
  * ``by_play`` / ``by_genre``: whole plays / genres are assigned to parts,
    largest first to the part with the fewest bytes so far (deterministic,
    balanced by bytes; ``seed`` is unused). Needs ``play`` / ``genre`` fields
    and ``part_count`` <= the number of plays / genres.

  The parts are disjoint and together cover every example. Metadata read
  from a source is cached for the life of the source object.
  """
  _check_index("part", part_index, part_count)
  if partition == "iid":
    n = len(source_or_metadata)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(np.array_split(perm, part_count)[part_index])
  if partition not in PARTITIONS:
    raise ValueError(f"Unknown partition {partition!r}; expected one of {PARTITIONS}.")
  field = "play" if partition == "by_play" else "genre"
  meta = source_or_metadata
  if not isinstance(meta, ExampleMetadata):
    first = meta[0] if len(meta) else None  # Fail fast before a full scan.
    if isinstance(first, Mapping) and "play" in first and "genre" in first:
      meta = _cached_metadata(source_or_metadata, text_key)
  groups = getattr(meta, field, None)
  if groups is None:
    raise ValueError(
        f"Partition {partition!r} needs 'play' and 'genre' fields in every "
        "record (the shakespeare dataset has them); this source only supports "
        "'iid'."
    )
  sizes = {g: int(meta.num_bytes[groups == g].sum()) for g in np.unique(groups)}
  if part_count > len(sizes):
    raise ValueError(
        f"Partition {partition!r}: part_count={part_count} exceeds the "
        f"number of {field}s ({len(sizes)})."
    )
  assignment = _balanced_assignment(sizes, part_count)
  mine = [g for g, p in assignment.items() if p == part_index]
  return np.flatnonzero(np.isin(groups, mine))


# ------------------------------------------------------------ tokenizing ---


@dataclasses.dataclass(frozen=True)
class _ReadAndTokenize:
  """Maps an example index to ``{"tokens": int32[n]}``."""

  source: Any
  tokenizer: Any
  text_key: str
  append_eos: bool

  def __call__(self, index) -> dict[str, np.ndarray]:
    ids = self.tokenizer.encode(_text_of(self.source[int(index)], self.text_key))
    if self.append_eos:
      ids = np.append(ids, np.int32(self.tokenizer.eos_id)).astype(np.int32)
    return {"tokens": ids}


def _lm_batch(rows: np.ndarray, valid: np.ndarray | None = None) -> dict:
  """Splits rows [B, T+1] into inputs/targets; ``valid`` = #real tokens/row."""
  rows = np.asarray(rows, np.int32)
  if valid is None:
    mask = np.ones((rows.shape[0], rows.shape[1] - 1), np.float32)
  else:
    mask = (np.arange(1, rows.shape[1])[None, :] < valid[:, None]).astype(np.float32)
  return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "mask": mask}


def _stack_tokens(batch: Sequence[Mapping[str, np.ndarray]]) -> dict:
  return _lm_batch(np.stack([e["tokens"] for e in batch]))


# ----------------------------------------------------------------- train ---


def make_train_iterator(
    source,
    *,
    tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    partition: str = "iid",
    part_index: int = 0,
    part_count: int = 1,
    append_eos: bool = False,
    text_key: str = "text",
    metadata: ExampleMetadata | None = None,
    num_threads: int = 0,
    prefetch_batches: int = 0,
) -> grain.DatasetIterator:
  """Infinite, checkpointable iterator of packed training batches.

  Yields ``{"inputs": int32[B, T], "targets": int32[B, T], "mask":
  float32[B, T]}`` (mask all ones). Examples: part ``part_index`` of
  ``partition`` (see ``partition_indices``; pass ``metadata`` to skip a scan
  of the source), then every ``shard_count``-th from ``shard_index``. Each
  epoch visits them in a new seeded order. Use the same ``seed`` on every
  process: it also fixes the ``iid`` partition. ``num_threads`` read threads
  and ``prefetch_batches`` background batches (0 = synchronous, the fastest
  on few cores). Supports ``get_state`` / ``set_state``; see
  ``save_iterator_state``.
  """
  _check_index("shard", shard_index, shard_count)
  if isinstance(tokenizer, str):
    tokenizer = tokenizers.get_tokenizer(tokenizer)
  chosen = _chosen_examples(source, metadata, partition, part_index, part_count, seed,
                            text_key, shard_index, shard_count)
  shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
  ds = (
      grain.MapDataset.source(chosen)
      .shuffle(seed=shuffle_seed)
      .repeat()
      .map(_ReadAndTokenize(source, tokenizer, text_key, append_eos))
      .to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                         prefetch_buffer_size=64 * max(num_threads, 1)))
      .filter(lambda e: e["tokens"].size > 0)
  )
  return iter(_packed_batches(ds, seq_len, batch_size, prefetch_batches))


def _chosen_examples(source, metadata, partition, part_index, part_count, seed, text_key,
                     shard_index, shard_count):
  """Indices of this part's examples, then every ``shard_count``-th from ``shard_index``."""
  chosen = partition_indices(
      source if metadata is None else metadata, partition, part_index,
      part_count, seed, text_key,
  )[shard_index::shard_count]
  if len(chosen) == 0:
    raise ValueError(
        f"No examples for part {part_index}/{part_count} ({partition}), shard "
        f"{shard_index}/{shard_count}: the source has {len(source)} examples."
    )
  return chosen


def _packed_batches(ds, seq_len: int, batch_size: int, prefetch_batches: int):
  """Tokenized examples -> ``seq_len + 1`` windows packed across examples -> stacked batches
  (``prefetch_batches`` > 0: built ahead on a background thread)."""
  ds = grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={"tokens": seq_len + 1}
  )
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_stack_tokens)
  if prefetch_batches > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=prefetch_batches
    )
  return ds


def save_iterator_state(iterator: grain.DatasetIterator) -> bytes:
  """Serializes ``iterator.get_state()`` as JSON bytes."""
  return json.dumps(iterator.get_state(), sort_keys=True).encode("utf-8")


def _lists_to_tuples(state: Any) -> Any:
  """JSON turns tuples (grain packing slices) into lists; undo that."""
  if isinstance(state, dict):
    return {k: _lists_to_tuples(v) for k, v in state.items()}
  if isinstance(state, list):
    return tuple(_lists_to_tuples(v) for v in state)
  return state


def restore_iterator_state(iterator: grain.DatasetIterator, data: bytes) -> None:
  """Restores a state from ``save_iterator_state`` into a fresh iterator
  built with the same arguments."""
  state = json.loads(data.decode("utf-8"))
  iterator.set_state(_lists_to_tuples(state))


# ------------------------------------------------------------------ eval ---


def _pack_rows(token_arrays, row_len: int, max_rows: int | None, pad_id: int):
  """Concatenates token arrays into rows [R, row_len] (last one padded).

  Returns ``(rows, valid)`` with ``valid[r]`` the number of real tokens; rows
  with fewer than 2 real tokens (no target) are dropped.
  """
  chunks, total = [], 0
  limit = None if max_rows is None else max_rows * row_len
  for ids in token_arrays:
    chunks.append(ids)
    total += len(ids)
    if limit is not None and total >= limit:
      break
  stream = np.concatenate(chunks + [np.zeros(0, np.int32)]).astype(np.int32)
  stream = stream if limit is None else stream[:limit]
  n_rows = -(-len(stream) // row_len)
  rows = np.full((n_rows, row_len), pad_id, np.int32)
  rows.reshape(-1)[: len(stream)] = stream
  valid = np.clip(len(stream) - row_len * np.arange(n_rows), 0, row_len)
  keep = valid >= 2
  return rows[keep], valid[keep]


def make_eval_batches(
    source,
    *,
    tokenizer,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    text_key: str = "text",
    append_eos: bool = False,
) -> list[dict[str, np.ndarray]]:
  """One deterministic, unshuffled pass over ``source``, packed into batches.

  Shard ``shard_index`` gets a contiguous slice of the examples. Padding
  (the last row's tail, filler rows of the last batch, and whole filler
  batches) has ``mask = 0``. Every shard returns the same number of batches:
  the largest shard's count, capped at ``max_batches``.
  """
  _check_index("shard", shard_index, shard_count)
  if isinstance(tokenizer, str):
    tokenizer = tokenizers.get_tokenizer(tokenizer)
  row_len, pad = seq_len + 1, tokenizer.pad_id
  max_rows = None if max_batches is None else max_batches * batch_size
  tokenize = _ReadAndTokenize(source, tokenizer, text_key, append_eos)
  packed = []
  for idx in np.array_split(np.arange(len(source)), shard_count):
    tokens = grain.MapDataset.source(idx).map(tokenize)
    packed.append(_pack_rows((e["tokens"] for e in tokens), row_len, max_rows, pad))
  n_batches = max(-(-len(rows) // batch_size) for rows, _ in packed)
  rows, valid = packed[shard_index]
  batches = []
  for b in range(n_batches):
    r = np.full((batch_size, row_len), pad, np.int32)
    v = np.zeros(batch_size, np.int64)
    part = slice(b * batch_size, (b + 1) * batch_size)
    r[: len(rows[part])], v[: len(valid[part])] = rows[part], valid[part]
    batches.append(_lm_batch(r, v))
  return batches
