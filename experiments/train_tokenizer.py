"""Trains a SentencePiece tokenizer offline on the Shakespeare train split.

  python -m experiments.train_tokenizer --vocab_size 1024 --out /tmp/spm

writes ``/tmp/spm.model`` / ``/tmp/spm.vocab`` (``--out`` is the model
prefix) and prints the tokenizer spec to put in the config
(``sentencepiece:/tmp/spm.model``). Only the train split is used, so the
validation tail of every play stays unseen.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fedjax_lm import data as data_lib


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--vocab_size", type=int, default=1024)
  p.add_argument("--out", required=True, help="model prefix, e.g. /tmp/spm")
  p.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's)")
  p.add_argument("--model_type", default="unigram", choices=["unigram", "bpe"])
  p.add_argument("--max_examples", type=int, default=0, help="0 = all speeches")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def main(argv=None) -> str:
  args = parse_args(argv)
  source = data_lib.get_source("shakespeare", "train", data_dir=args.data_dir)
  n = len(source) if args.max_examples <= 0 else min(args.max_examples, len(source))
  texts = [r["text"].decode("utf-8") for r in source.__getitems__(list(range(n)))]
  start = time.time()
  model = data_lib.train_sentencepiece(
      texts, args.out, args.vocab_size, model_type=args.model_type, seed=args.seed
  )
  tokenizer = data_lib.SentencePieceTokenizer(model)
  sample = "".join(texts[:2000])
  ids = tokenizer.encode(sample)
  assert tokenizer.decode(ids) == sample, "SentencePiece round trip failed"
  bytes_per_token = float(np.sum(tokenizer.token_bytes()[ids])) / max(len(ids), 1)
  print(f"Trained on {n} speeches in {time.time() - start:.1f}s: {model}")
  print(f"vocab_size={tokenizer.vocab_size}, {bytes_per_token:.2f} bytes/token")
  print(f"tokenizer spec: sentencepiece:{model}")
  return model


if __name__ == "__main__":
  main()
