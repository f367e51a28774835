"""Tests for fedjax_lm.data: tokenizers, Shakespeare builder, grain pipelines."""

import collections
import json
import re
import tarfile
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fedjax_lm import data as data_lib
from fedjax_lm.data import shakespeare as shakespeare_lib

SEQ, B = 63, 4  # Small rows keep the pipeline tests fast.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def sources(data_dir):
  return data_lib.prepare_shakespeare(data_dir)


@pytest.fixture(scope="module")
def metadata(sources):
  return data_lib.example_metadata(sources["train"])


@pytest.fixture(scope="module")
def archive_files():
  """{(genre, slug): bytes} read straight from the vendored archive."""
  out = {}
  with tarfile.open(shakespeare_lib.DEFAULT_ARCHIVE, "r:xz") as tar:
    for m in tar.getmembers():
      if m.isfile():
        genre, name = m.name.split("/")
        out[(genre, name[:-3])] = tar.extractfile(m).read()
  return out


@pytest.fixture(scope="module")
def tagged_source():
  """100 examples whose text names their index, e.g. '[0042]'."""
  return [f"[{i:04d}]" for i in range(100)]


def _records(source):
  return source.__getitems__(list(range(len(source))))


def _stream(batches):
  """Rebuilds the token stream of consecutive unpadded training batches."""
  rows = [np.append(b["inputs"][r], b["targets"][r, -1])
          for b in batches for r in range(len(b["inputs"]))]
  return np.concatenate(rows)


def _take(it, n):
  return [next(it) for _ in range(n)]


# ------------------------------------------------------------ tokenizers ---


def test_byte_tokenizer_round_trip():
  tok = data_lib.ByteTokenizer()
  text = "To be, or not to be — ça va? 日本語 🎭\n"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.decode(np.concatenate([ids, [tok.eos_id, tok.pad_id]])) == text
  assert tok.encode(text.encode("utf-8")).tolist() == ids.tolist()
  assert tok.vocab_size == 258 and (tok.eos_id, tok.pad_id) == (256, 257)
  tb = tok.token_bytes()
  assert tb.shape == (258,) and tb.dtype == np.float32
  assert tb[:256].tolist() == [1.0] * 256 and tb[256:].tolist() == [0.0, 0.0]


def test_get_tokenizer_specs(tmp_path):
  assert isinstance(data_lib.get_tokenizer("byte"), data_lib.ByteTokenizer)
  with pytest.raises(ValueError, match="'wordpiece'"):
    data_lib.get_tokenizer("wordpiece")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    data_lib.get_tokenizer(f"sentencepiece:{tmp_path}/nope.model")


def test_sentencepiece_train_and_round_trip(tmp_path, archive_files):
  text = archive_files[("tragedies", "hamlet")].decode("utf-8")
  speeches = [s + "\n\n" for s in text[:60_000].split("\n\n")]
  model = data_lib.train_sentencepiece(speeches, tmp_path / "spm", 400)
  tok = data_lib.get_tokenizer(f"sentencepiece:{model}")
  assert tok.vocab_size == 400
  for s in [text[60_000:70_000], "Ça, señor — 日本語 🎭  \n\n  x"]:
    ids = tok.encode(s)
    assert ids.dtype == np.int32
    assert tok.decode(ids) == s
    assert tok.decode(np.append(ids, tok.eos_id)) == s
    assert tok.token_bytes()[ids].sum() == len(s.encode("utf-8"))
  tb = tok.token_bytes()
  assert tb[tok.eos_id] == 0 and tb[tok.pad_id] == 0 and tb[0] == 0  # unk


# ---------------------------------------------------------------- builder ---


def test_split_play_rule():
  play = ("# T\n\n## ACT I\n\n### SCENE II. A room.\n\n_Enter A_\n\n"
          "**A**  \nHi.\n\n_Exit_\n\n**B**  \nBye.\n\n## ACT II\n\n### PROLOGUE\n\n"
          "**C**  \nEnd.")
  blocks = shakespeare_lib.split_play(play)
  assert "".join(b.text for b in blocks) == play
  assert [(b.speaker, b.act, b.scene) for b in blocks] == [
      ("", "I", "II"), ("A", "I", "II"), ("B", "I", "II"),
      ("", "II", "PROLOGUE"), ("C", "II", "PROLOGUE")]
  assert blocks[1].text.endswith("_Exit_\n\n")  # Directions stay with the speech.


def test_builder_reproduces_every_play(sources, archive_files):
  by_play = collections.defaultdict(dict)
  for split in ("train", "validation"):
    for r in _records(sources[split]):
      key = (r["genre"].decode(), r["play"].decode())
      assert int(r["index"]) not in by_play[key]
      by_play[key][int(r["index"])] = (split, r["text"])
  assert set(by_play) == set(archive_files)
  assert len(by_play) == 38 and len({g for g, _ in by_play}) == 6
  for key, blocks in by_play.items():
    order = sorted(blocks)
    assert order == list(range(len(order)))
    splits = [blocks[i][0] for i in order]
    n_train = splits.count("train")
    assert splits == ["train"] * n_train + ["validation"] * (len(order) - n_train)
    assert b"".join(blocks[i][1] for i in order) == archive_files[key], key
    val_bytes = sum(len(blocks[i][1]) for i in order[n_train:])
    assert 0.05 <= val_bytes / len(archive_files[key]) < 0.15, key


def test_builder_features(sources):
  for r in _records(sources["validation"]):
    speaker = r["speaker"].decode()
    if speaker:
      assert r["text"].startswith(f"**{speaker}**".encode())
    else:
      assert r["text"].startswith(b"#")


def test_prepare_is_idempotent_and_fast(data_dir, sources):
  start = time.time()
  again = data_lib.prepare_shakespeare(data_dir)
  assert time.time() - start < 2.0
  assert len(again["train"]) == len(sources["train"]) > 25_000


# ------------------------------------------------------------- partitions ---


@pytest.mark.parametrize("partition,count", [("iid", 3), ("by_play", 4), ("by_genre", 3)])
def test_partitions_disjoint_and_covering(metadata, partition, count):
  parts = [data_lib.partition_indices(metadata, partition, i, count, seed=1)
           for i in range(count)]
  joined = np.concatenate(parts)
  assert len(joined) == len(metadata) and len(np.unique(joined)) == len(metadata)
  groups = {"iid": None, "by_play": metadata.play, "by_genre": metadata.genre}[partition]
  if groups is not None:  # Whole groups per part, balanced by bytes.
    sets = [set(groups[p]) for p in parts]
    assert all(a.isdisjoint(b) for i, a in enumerate(sets) for b in sets[i + 1:])
  sizes = [metadata.num_bytes[p].sum() for p in parts]
  assert min(sizes) > 0
  if partition == "by_play":
    assert max(sizes) / min(sizes) < 1.1


def test_partition_errors(metadata, tagged_source):
  with pytest.raises(ValueError, match="exceeds the number of genres"):
    data_lib.partition_indices(metadata, "by_genre", 0, 7)
  with pytest.raises(ValueError, match="'iid'"):
    data_lib.partition_indices(tagged_source, "by_play", 0, 2)
  with pytest.raises(ValueError, match="'by_speaker'"):
    data_lib.partition_indices(metadata, "by_speaker", 0, 2)
  a = data_lib.partition_indices(tagged_source, "iid", 0, 2, seed=0)
  assert not np.array_equal(a, data_lib.partition_indices(tagged_source, "iid", 0, 2, seed=1))


# -------------------------------------------------------------- training ---


def _train_it(source, seed=0, **kw):
  kw = dict(tokenizer=data_lib.ByteTokenizer(), seq_len=SEQ, batch_size=B, seed=seed) | kw
  return data_lib.make_train_iterator(source, **kw)


def test_train_batches_shapes_and_determinism(sources):
  a = _take(_train_it(sources["train"], seed=3), 3)
  b = _take(_train_it(sources["train"], seed=3), 3)
  c = _take(_train_it(sources["train"], seed=4), 3)
  for x, y in zip(a, b):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
  batch = a[0]
  assert batch["inputs"].shape == batch["targets"].shape == (B, SEQ)
  assert batch["inputs"].dtype == np.int32 and batch["mask"].dtype == np.float32
  assert np.array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  assert np.all(batch["mask"] == 1.0) and np.all(batch["inputs"] < 256)


def test_train_epochs_reshuffle(tagged_source):
  it = _train_it(tagged_source, seq_len=29, batch_size=2)  # 10 batches = 1 epoch.
  epochs = [re.findall(r"\[(\d{4})\]", data_lib.ByteTokenizer().decode(_stream(_take(it, 10))))
            for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == [f"{i:04d}" for i in range(100)]
  assert epochs[0] != epochs[1]


def test_train_shards_and_parts_disjoint(tagged_source):
  seen = []
  for part in range(2):
    for shard in range(2):  # 25 examples x 6 bytes = 150 bytes = 5 batches.
      it = _train_it(tagged_source, seq_len=14, batch_size=2, partition="iid",
                     part_index=part, part_count=2, shard_index=shard, shard_count=2)
      text = data_lib.ByteTokenizer().decode(_stream(_take(it, 5)))
      seen.append(set(re.findall(r"\[(\d{4})\]", text)))
  assert all(len(s) == 25 for s in seen)
  assert set.union(*seen) == {f"{i:04d}" for i in range(100)}


def test_train_by_play_uses_only_its_plays(sources, metadata):
  idx = data_lib.partition_indices(metadata, "by_play", 1, 5)
  it = _train_it(sources["train"], partition="by_play", part_index=1, part_count=5,
                 metadata=metadata, seq_len=2047)
  text = data_lib.ByteTokenizer().decode(_stream(_take(it, 4)))
  mine = "".join(sources["train"][int(i)]["text"].decode() for i in idx)
  assert all(line in mine for line in text.splitlines()[1:-1])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_iterator_state_restore(sources, prefetch):
  kw = dict(seed=5, append_eos=True, prefetch_batches=prefetch)
  it = _train_it(sources["train"], **kw)
  _take(it, 7)
  saved = data_lib.save_iterator_state(it)
  json.loads(saved)
  expected = _take(it, 4)
  fresh = _train_it(sources["train"], **kw)
  data_lib.restore_iterator_state(fresh, saved)
  for x, y in zip(expected, _take(fresh, 4)):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert (_stream(expected) == 256).any()  # EOS appended.


def test_iterator_state_restore_at_every_step(sources):
  """Covers all packing states (e.g. an unsplit remainder element)."""
  it = _train_it(sources["train"], seed=0)
  saved, batches = [], []
  for _ in range(40):
    saved.append(data_lib.save_iterator_state(it))
    batches.append(next(it))
  for step in range(0, 39):
    fresh = _train_it(sources["train"], seed=0)
    data_lib.restore_iterator_state(fresh, saved[step])
    for want in batches[step:step + 2]:
      assert np.array_equal(next(fresh)["inputs"], want["inputs"]), step


# ------------------------------------------------------------------ eval ---


def test_eval_batches_counts_and_masks(sources):
  val = sources["validation"]
  tok = data_lib.ByteTokenizer()
  shards = [data_lib.make_eval_batches(val, tokenizer=tok, seq_len=SEQ * 8, batch_size=B,
                                       shard_index=i, shard_count=3) for i in range(3)]
  assert len({len(s) for s in shards}) == 1
  texts = [r["text"] for r in _records(val)]
  streams = []
  for batches, idx in zip(shards, np.array_split(np.arange(len(texts)), 3)):
    expected = tok.encode(b"".join(texts[i] for i in idx))
    got = []
    for b in batches:
      assert b["inputs"].shape == (B, SEQ * 8) and b["mask"].dtype == np.float32
      for r in range(B):
        n = int(b["mask"][r].sum())
        assert np.all(b["mask"][r, :n] == 1) and np.all(b["mask"][r, n:] == 0)
        assert np.all(b["targets"][r, n:] == tok.pad_id)
        if n:
          got.append(np.append(b["inputs"][r, 0], b["targets"][r, :n]))
    assert np.array_equal(np.concatenate(got), expected)
    streams.append(expected)
  assert len(np.concatenate(streams)) == sum(len(t) for t in texts)


def test_eval_batches_max_batches_and_padding_batches(tagged_source):
  tok = data_lib.ByteTokenizer()
  kw = dict(tokenizer=tok, seq_len=9, batch_size=2)
  capped = [data_lib.make_eval_batches(tagged_source, max_batches=3, shard_index=i,
                                       shard_count=2, **kw) for i in range(2)]
  assert [len(c) for c in capped] == [3, 3] and all(b["mask"].all() for c in capped for b in c)
  # 10 short examples over 4 shards: 3/3/2/2 examples -> 18/18/12/12 bytes.
  small = [data_lib.make_eval_batches(tagged_source[:10], shard_index=i, shard_count=4, **kw)
           for i in range(4)]
  assert [len(s) for s in small] == [1, 1, 1, 1]
  assert [int(s[0]["mask"].sum()) for s in small] == [16, 16, 10, 10]
  # 3 examples over 2 shards, one row per batch: 12 bytes -> 2 rows, 6 -> 1 row.
  uneven = [data_lib.make_eval_batches(tagged_source[:3], tokenizer=tok, seq_len=9,
                                       batch_size=1, shard_index=i, shard_count=2)
            for i in range(2)]
  assert [[int(b["mask"].sum()) for b in u] for u in uneven] == [[9, 1], [5, 0]]
  assert np.all(uneven[1][1]["inputs"] == tok.pad_id)


# ------------------------------------------------------- catalog sources ---


def test_catalog_source_with_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    source = data_lib.get_source("lm1b", "train", data_dir=str(tmp_path))
    assert len(source) == 12 and isinstance(source[0]["text"], (str, bytes))
    batch = next(_train_it(source, seq_len=7, batch_size=2))
    assert batch["inputs"].shape == (2, 7)
    with pytest.raises(ValueError, match="only supports 'iid'"):
      _train_it(source, partition="by_genre", part_count=2)


def test_catalog_source_reads_locally_built_dataset(data_dir, sources):
  source = data_lib.get_source("shakespeare_plays", "validation", data_dir=data_dir)
  assert len(source) == len(sources["validation"])
  assert data_lib.get_source("shakespeare", "validation", data_dir=data_dir)[0] == source[0]


@pytest.mark.parametrize("name", ["lm1b", "c4/en", "no_such_dataset_xyz"])
def test_missing_dataset_clear_error(tmp_path, name):
  for data_dir in (tmp_path, tmp_path / "missing"):
    with pytest.raises(data_lib.DatasetUnavailableError) as e:
      data_lib.get_source(name, "train", data_dir=str(data_dir))
    assert name in str(e.value) and str(data_dir) in str(e.value)


def test_corrupt_corpus_archive_is_one_clear_error(tmp_path):
  """A truncated archive is a ValueError naming the file (one line through the CLI), raised
  before anything is built."""
  damaged = tmp_path / "shakespeare.tar.xz"
  damaged.write_bytes(open(shakespeare_lib.DEFAULT_ARCHIVE, "rb").read()[:300_000])
  with pytest.raises(ValueError, match="corrupt Shakespeare archive .*shakespeare.tar.xz"):
    list(shakespeare_lib.read_plays(str(damaged)))
