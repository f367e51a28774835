"""Tokenizers: UTF-8 bytes and SentencePiece, with a common interface.

Every tokenizer exposes ``vocab_size``, ``eos_id``, ``pad_id``,
``encode(text) -> int32[n]``, ``decode(ids) -> str`` (special ids ignored) and
``token_bytes() -> float32[vocab_size]``: how many UTF-8 bytes of text each id
stands for (0 for special ids), so ``sum(token_bytes()[ids]) ==
len(text.encode())`` for lossless tokenizers; it turns a per-token loss into
bits per byte. ``encode`` accepts ``str`` or UTF-8 ``bytes``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Protocol

import numpy as np
import sentencepiece as spm

_SPACE_PIECE = "\u2581"  # SentencePiece's visible space '▁'.


class Tokenizer(Protocol):
  """Interface shared by all tokenizers of this package."""

  eos_id: int
  pad_id: int

  @property
  def vocab_size(self) -> int:
    ...

  def encode(self, text: str | bytes) -> np.ndarray:
    ...

  def decode(self, ids) -> str:
    ...

  def token_bytes(self) -> np.ndarray:
    ...


class ByteTokenizer:
  """UTF-8 byte tokenizer.

  Ids 0..255 are the raw bytes, ``eos_id = 256`` marks the end of a document
  and ``pad_id = 257`` fills padded positions (always masked), so
  ``vocab_size = 258``.
  """

  eos_id = 256
  pad_id = 257

  @property
  def vocab_size(self) -> int:
    return 258

  def encode(self, text: str | bytes) -> np.ndarray:
    """Returns the UTF-8 bytes of ``text`` as int32 ids."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    """Decodes byte ids, skipping specials; invalid UTF-8 becomes U+FFFD."""
    ids = np.asarray(ids).reshape(-1)
    data = ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()
    return data.decode("utf-8", errors="replace")

  def token_bytes(self) -> np.ndarray:
    out = np.zeros(self.vocab_size, np.float32)
    out[:256] = 1.0
    return out

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class SentencePieceTokenizer:
  """Wraps a trained SentencePiece ``.model`` file.

  ``eos_id`` is the model's EOS id; ``pad_id`` is the model's PAD id, or the
  EOS id (else 0) when the model has none. Padded positions are always masked,
  so the pad id only has to be a valid id.
  """

  def __init__(self, model_path: str | os.PathLike):
    model_path = os.fspath(model_path)
    if not os.path.isfile(model_path):
      raise FileNotFoundError(f"SentencePiece model not found: {model_path!r}")
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self.eos_id = int(self._sp.eos_id())
    pad = int(self._sp.pad_id())
    self.pad_id = pad if pad >= 0 else max(self.eos_id, 0)

  @property
  def vocab_size(self) -> int:
    return int(self._sp.get_piece_size())

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, (bytes, bytearray, memoryview)):
      text = bytes(text).decode("utf-8")
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids) -> str:
    """Decodes ids; control ids (BOS/EOS/PAD) decode to nothing."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self._sp.decode([i for i in ids if 0 <= i < self.vocab_size])

  def token_bytes(self) -> np.ndarray:
    """UTF-8 length of each piece ('▁' = one space byte; byte pieces = 1)."""
    sp = self._sp
    out = np.zeros(self.vocab_size, np.float32)
    for i in range(self.vocab_size):
      if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
        continue
      if sp.is_byte(i):
        out[i] = 1.0
        continue
      piece = sp.id_to_piece(i).replace(_SPACE_PIECE, " ")
      out[i] = len(piece.encode("utf-8"))
    return out

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.model_path!r})"


def train_sentencepiece(
    texts_or_file: Iterable[str] | str | os.PathLike,
    model_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    max_sentence_length: int = 1 << 16,
    input_sentence_size: int = 0,
    num_threads: int = 2,
    seed: int = 0,
    **trainer_kwargs,
) -> str:
  """Trains a lossless SentencePiece model offline; returns the .model path.

  ``texts_or_file`` is a path to a text file (one sentence per line) or an
  iterable of strings (each one a sentence; newlines inside are kept).
  Normalization, whitespace trimming and the dummy prefix are disabled and
  ``byte_fallback=True``, so ``decode(encode(s)) == s`` for any string and
  ``token_bytes`` sums to the exact UTF-8 length. Ids: unk=0, bos=1, eos=2,
  pad=3. Extra ``trainer_kwargs`` go to ``SentencePieceTrainer.train``.
  """
  model_prefix = os.fspath(model_prefix)
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  kwargs = dict(
      model_prefix=model_prefix,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=character_coverage,
      byte_fallback=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      max_sentence_length=max_sentence_length,
      input_sentence_size=input_sentence_size,
      shuffle_input_sentence=input_sentence_size > 0,
      num_threads=num_threads,
      unk_id=0,
      bos_id=1,
      eos_id=2,
      pad_id=3,
      minloglevel=2,
  )
  kwargs.update(trainer_kwargs)
  spm.set_random_generator_seed(seed)
  if isinstance(texts_or_file, (str, os.PathLike)):
    path = os.fspath(texts_or_file)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"SentencePiece training file not found: {path!r}")
    spm.SentencePieceTrainer.train(input=path, **kwargs)
  else:
    texts = (t for t in texts_or_file if t)
    spm.SentencePieceTrainer.train(sentence_iterator=texts, **kwargs)
  return model_prefix + ".model"


def get_tokenizer(spec: str) -> ByteTokenizer | SentencePieceTokenizer:
  """Builds a tokenizer from ``"byte"`` or ``"sentencepiece:/path/x.model"``."""
  if spec == "byte":
    return ByteTokenizer()
  kind, sep, path = spec.partition(":")
  if kind == "sentencepiece" and sep and path:
    return SentencePieceTokenizer(path)
  raise ValueError(
      f"Unknown tokenizer spec {spec!r}: expected 'byte' or "
      "'sentencepiece:/path/to/model.model'."
  )
