"""TFDS builder for Shakespeare's 38 plays, one example per speech.

Source: the vendored archive ``corpus/shakespeare.tar.xz`` (Markdown, one file
per play under a genre folder; see ``corpus/NOTICE.md``). Nothing is
downloaded; the archive path can be overridden.

Speech splitting: each play's text is cut at line starts into consecutive
blocks. A block starts at every ``**SPEAKER**`` line (a *speech*, ``speaker``
= the name) and at every ``#`` heading line that follows a speech (a
*non-speech* block, ``speaker = ""``). So a non-speech block holds the title
or a run of act/scene headings plus the stage directions (``_..._``) up to the
next speaker, and stage directions between two speeches (``_Exit_``,
``_Enter ..._``) stay at the end of the preceding speech. Blank lines stay
with the block they end. ``act`` (roman numeral, "" before ACT I) and
``scene`` (roman numeral, or PROLOGUE / EPILOGUE / INTERMISSION / INDUCTION,
"" before the first scene of an act) are those in effect at the end of the
block. ``index`` numbers a play's blocks from 0.

Validation split: the tail of EVERY play. The play is cut at the start of the
block that contains byte ``floor(0.95 * len(play))``; that block and all later
ones are ``validation`` (so each play contributes >= 5% of its bytes and at
least one block), the rest ``train``. Deterministic; no shuffling, examples
are stored in play order. Concatenating a play's ``text`` in ``index`` order
(train then validation) reproduces the play file byte for byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import lzma
import os
import re
import tarfile
from collections.abc import Iterator

import importlib_resources
import numpy as np
import tensorflow_datasets as tfds

NAME = "shakespeare_plays"
VALIDATION_FRACTION = 0.05
DEFAULT_ARCHIVE = str(
    importlib_resources.files("fedjax_lm.data") / "corpus" / "shakespeare.tar.xz"
)

_SPEAKER_RE = re.compile(r"\*\*(.+?)\*\*[ \t]*\n?$")
_ACT_RE = re.compile(r"#+\s*ACT\s+([IVXLC]+)\b", re.IGNORECASE)
_SCENE_RE = re.compile(r"#+\s*SCENE\s+([IVXLC]+)\b", re.IGNORECASE)
_PART_RE = re.compile(
    r"#+\s*(PROLOGUE|EPILOGUE|INTERMISSION|INDUCTION)\b", re.IGNORECASE
)


@dataclasses.dataclass(frozen=True)
class Block:
  """A consecutive piece of a play (a speech or a non-speech block)."""

  text: str
  speaker: str
  act: str
  scene: str


def _lines(text: str) -> list[str]:
  """Splits on '\\n' only, keeping the newlines (``''.join`` inverts it)."""
  parts = text.split("\n")
  lines = [p + "\n" for p in parts[:-1]]
  return lines + [parts[-1]] if parts[-1] else lines


def split_play(text: str) -> list[Block]:
  """Splits a play's Markdown into blocks (see the module docstring)."""
  blocks: list[Block] = []
  lines: list[str] = []
  speaker: str | None = None  # None: the current block is non-speech.
  act = scene = ""

  def close():
    if lines:
      blocks.append(Block("".join(lines), speaker or "", act, scene))

  for line in _lines(text):
    speech = _SPEAKER_RE.match(line)
    heading = line.startswith("#")
    if speech or (heading and speaker is not None):
      close()
      lines = []
      speaker = speech.group(1).strip() if speech else None
    if heading:
      if m := _ACT_RE.match(line):
        act, scene = m.group(1).upper(), ""
      elif m := _SCENE_RE.match(line):
        scene = m.group(1).upper()
      elif m := _PART_RE.match(line):
        scene = m.group(1).upper()
    lines.append(line)
  close()
  return blocks


def validation_start(blocks: list[Block]) -> int:
  """Index of the first validation block: the one holding the 95% byte."""
  sizes = np.array([len(b.text.encode("utf-8")) for b in blocks])
  cut = int(np.floor((1.0 - VALIDATION_FRACTION) * sizes.sum()))
  ends = np.cumsum(sizes)
  return int(min(np.searchsorted(ends, cut, side="right"), len(blocks) - 1))


def read_plays(archive_path: str | None = None) -> Iterator[tuple[str, str, str]]:
  """Yields ``(genre, slug, text)`` for each ``genre/slug.md`` in the archive."""
  archive_path = archive_path or DEFAULT_ARCHIVE
  if not os.path.isfile(archive_path):
    raise FileNotFoundError(f"Shakespeare archive not found: {archive_path!r}")
  plays = []
  try:  # read whole first, so a damaged archive is one clear error before anything is built
    with tarfile.open(archive_path, "r:xz") as tar:
      for member in sorted(tar.getmembers(), key=lambda m: m.name):
        parts = member.name.strip("./").split("/")
        if not member.isfile() or len(parts) != 2 or not parts[1].endswith(".md"):
          continue
        data = tar.extractfile(member).read()
        plays.append((parts[0], parts[1][: -len(".md")], data.decode("utf-8")))
  except (EOFError, tarfile.TarError, lzma.LZMAError, UnicodeDecodeError) as e:
    raise ValueError(f"corrupt Shakespeare archive {archive_path!r} ({type(e).__name__}: {e}); "
                     "restore it (git checkout) or reinstall fedjax_lm") from e
  yield from plays


class ShakespearePlays(tfds.core.GeneratorBasedBuilder):
  """Shakespeare's plays as speeches; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: speeches of 38 plays."}

  def __init__(self, *, archive_path: str | None = None, **kwargs):
    self._archive_path = archive_path or DEFAULT_ARCHIVE
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "text": text(doc="Block text, byte-exact slice of the play."),
            "play": text(doc="Play slug, e.g. 'hamlet'."),
            "genre": text(doc="Genre folder, e.g. 'tragedies'."),
            "speaker": text(doc="Speaker name; '' for non-speech blocks."),
            "act": text(doc="Act roman numeral or ''."),
            "scene": text(doc="Scene roman numeral, PROLOGUE, ... or ''."),
            "index": tfds.features.Scalar(np.int32, doc="Position in play."),
        }),
        homepage="https://shakespeare.mit.edu/",
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data is vendored; nothing to download.
    return {
        "train": self._generate_examples(split="train"),
        "validation": self._generate_examples(split="validation"),
    }

  def _generate_examples(self, split: str):
    for genre, play, text in read_plays(self._archive_path):
      blocks = split_play(text)
      start = validation_start(blocks)
      chosen = range(start) if split == "train" else range(start, len(blocks))
      for i in chosen:
        b = blocks[i]
        yield f"{play}/{i:05d}", {
            "text": b.text, "play": play, "genre": genre, "speaker": b.speaker,
            "act": b.act, "scene": b.scene, "index": i,
        }


def default_data_dir() -> str:
  """``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
  return os.path.expanduser(
      os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  )


@contextlib.contextmanager
def _exclusive_lock(path: str):
  """Inter-process lock (``flock``) so that one process builds at a time."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare_shakespeare(
    data_dir: str | None = None,
    *,
    split: str | None = None,
    archive_path: str | None = None,
):
  """Builds the dataset into ``data_dir`` if needed and returns data sources.

  Idempotent: an already prepared ``data_dir`` is reused as is (the archive is
  only read when building); processes racing to build it take turns through a
  lock file. Returns ``tfds.data_source(...)`` (TF-free random access): a dict
  ``{"train": ..., "validation": ...}``, or one source when ``split`` is given
  (TFDS split syntax such as ``"train[:10%]"`` works).
  """
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  if not ShakespearePlays(data_dir=data_dir).is_prepared():
    with _exclusive_lock(os.path.join(data_dir, f".{NAME}.lock")):
      builder = ShakespearePlays(data_dir=data_dir, archive_path=archive_path)
      try:
        if not builder.is_prepared():  # Re-check: another process may have won.
          builder.download_and_prepare()
      except FileExistsError:  # Lock-less filesystem: another process won.
        if not ShakespearePlays(data_dir=data_dir).is_prepared():
          raise
  return tfds.data_source(NAME, split=split, data_dir=data_dir, download=False)
