"""``local_c4``: a TFDS dataset shaped like ``c4/en``, built offline, for runs at real size.

C4 itself cannot be downloaded here. This builder writes a real TFDS dataset in C4's shape
(features ``text``, ``url``, ``timestamp``; splits ``train`` / ``validation``; ``array_record``
files) so that a run reads it exactly as it reads C4: ``data.get_source("local_c4", split,
data_dir)`` -> ``tfds.data_source`` -> the grain pipeline of :mod:`fedjax_lm.data.pipeline`.
Nothing is special-cased for it downstream.

Documents: every scene of the vendored Shakespeare corpus (``corpus/shakespeare.tar.xz``; the
title block, act headings and stage directions stay with the scene they open), ~750 documents
of a few KB, like C4's web pages; optionally also the paragraphs-grouped-to-``doc_bytes`` of
any plain UTF-8 text files passed as ``text_files`` (for a larger corpus). ``url`` is
``local://<play>/<scene index>`` (or ``local://<file name>/<chunk>``); ``timestamp`` is fixed.
Validation: the documents whose url hashes (SHA-256) into 1/20 of the space, a deterministic
~5% sample like C4's separate validation files; the rest is ``train``.

Build it once (idempotent; other processes take turns through a lock file):

    python -m fedjax_lm.data.local_c4 --data_dir /tmp/scale/tfds

then train with ``--config.data.name=local_c4 --config.data.data_dir=/tmp/scale/tfds``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from fedjax_lm.data import shakespeare as shakespeare_lib

if __name__ == "__main__":
  # `python -m fedjax_lm.data.local_c4` runs this file a second time beside the copy that
  # `fedjax_lm.data` imported, which registered the builder: run that copy's CLI (defining the
  # builder again here would be refused by TFDS's registry).
  import sys  # pylint: disable=g-import-not-at-top
  sys.exit(sys.modules["fedjax_lm.data.local_c4"].main())

NAME = "local_c4"
TIMESTAMP = "2019-04-25T00:00:00Z"
VALIDATION_ONE_IN = 20


def _is_validation(url: str) -> bool:
  digest = hashlib.sha256(url.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % VALIDATION_ONE_IN == 0


def shakespeare_documents(archive_path: str | None = None) -> Iterator[tuple[str, str]]:
  """``(url, text)`` per scene: a play's blocks grouped by (act, scene) in play order."""
  for _, play, text in shakespeare_lib.read_plays(archive_path):
    blocks = shakespeare_lib.split_play(text)
    doc: list[str] = []
    key = None
    index = 0
    for b in blocks:
      # A non-speech block opens the next scene (it holds its headings); speeches continue.
      if doc and b.speaker == "" and (b.act, b.scene) != key:
        yield f"local://{play}/{index:03d}", "".join(doc)
        doc, index = [], index + 1
      doc.append(b.text)
      key = (b.act, b.scene)
    if doc:
      yield f"local://{play}/{index:03d}", "".join(doc)


def text_file_documents(paths: Sequence[str], doc_bytes: int = 4096
                        ) -> Iterator[tuple[str, str]]:
  """``(url, text)``: consecutive paragraphs of each file grouped to about ``doc_bytes``."""
  for path in sorted(paths):
    with open(path, encoding="utf-8", errors="replace") as f:
      paragraphs = f.read().split("\n\n")
    doc, size, index = [], 0, 0
    for par in paragraphs:
      doc.append(par)
      size += len(par.encode("utf-8")) + 2
      if size >= doc_bytes:
        yield f"local://{os.path.basename(path)}/{index:05d}", "\n\n".join(doc)
        doc, size, index = [], 0, index + 1
    if doc and "".join(doc).strip():
      yield f"local://{os.path.basename(path)}/{index:05d}", "\n\n".join(doc)


class LocalC4(tfds.core.GeneratorBasedBuilder):
  """C4-shaped documents from offline text; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Scenes of the vendored Shakespeare corpus (+ optional files)."}

  def __init__(self, *, archive_path: str | None = None, text_files: Sequence[str] = (),
               **kwargs):
    self._archive_path = archive_path
    self._text_files = tuple(text_files)
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "url": tfds.features.Text(),
            "timestamp": tfds.features.Text(),
        }),
        homepage="https://www.tensorflow.org/datasets/catalog/c4",
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples(validation=False),
            "validation": self._generate_examples(validation=True)}

  def _documents(self) -> Iterator[tuple[str, str]]:
    yield from shakespeare_documents(self._archive_path)
    yield from text_file_documents(self._text_files)

  def _generate_examples(self, validation: bool):
    for url, text in self._documents():
      if text.strip() and _is_validation(url) == validation:
        yield url, {"text": text, "url": url, "timestamp": TIMESTAMP}


def prepare_local_c4(data_dir: str | None = None, *, split: str | None = None,
                     archive_path: str | None = None, text_files: Sequence[str] = ()):
  """Builds ``local_c4`` into ``data_dir`` if needed; returns ``tfds.data_source`` (a dict of
  splits, or one split). An already prepared ``data_dir`` is reused as is."""
  data_dir = os.path.expanduser(data_dir or shakespeare_lib.default_data_dir())
  if not LocalC4(data_dir=data_dir).is_prepared():
    with shakespeare_lib._exclusive_lock(os.path.join(data_dir, f".{NAME}.lock")):  # pylint: disable=protected-access
      builder = LocalC4(data_dir=data_dir, archive_path=archive_path, text_files=text_files)
      if not builder.is_prepared():
        builder.download_and_prepare()
  return tfds.data_source(NAME, split=split, data_dir=data_dir, download=False)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data_dir", required=True)
  p.add_argument("--text_files", nargs="*", default=(), help="extra UTF-8 text files")
  args = p.parse_args(argv)
  sources = prepare_local_c4(args.data_dir, text_files=args.text_files)
  for split, source in sources.items():
    sizes = [len(r["text"]) for r in source.__getitems__(list(range(len(source))))]
    print(f"{NAME}/{split}: {len(source)} documents, {sum(sizes) / 1e6:.2f}M bytes, "
          f"median {int(np.median(sizes))} bytes")
  print(f"prepared in {args.data_dir}: --config.data.name={NAME} "
        f"--config.data.data_dir={args.data_dir}")

