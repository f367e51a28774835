"""Trains a SentencePiece tokenizer offline on a dataset's train split.

  python -m experiments.train_tokenizer --vocab_size 1024 --out /tmp/spm

writes ``/tmp/spm.model`` / ``/tmp/spm.vocab`` (``--out`` is the model
prefix) and prints the tokenizer spec to put in the config
(``sentencepiece:/tmp/spm.model``). Only the train split is used, so the
validation documents stay unseen. ``--dataset`` is any name ``get_source``
reads (``shakespeare``, the default; ``local_c4``, built on demand; ``c4/en``
prepared as array_record; ...). The 32k tokenizer of ``configs/c4_150m.py`` on
the offline C4 stand-in (unigram stops at ~25k pieces on 5 MB of text, BPE
reaches 32,768):

  python -m experiments.train_tokenizer --dataset local_c4 \
      --data_dir /tmp/scale/tfds --vocab_size 32768 --model_type bpe \
      --out /tmp/scale/c4_32k
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
  p.add_argument("--dataset", default="shakespeare",
                 help="shakespeare | local_c4 (built on demand) | a prepared TFDS name")
  p.add_argument("--text_key", default="text")
  p.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's)")
  p.add_argument("--model_type", default="unigram", choices=["unigram", "bpe"])
  p.add_argument("--max_examples", type=int, default=0, help="0 = all examples")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def main(argv=None) -> str:
  args = parse_args(argv)
  if args.dataset == "local_c4":
    source = data_lib.prepare_local_c4(args.data_dir, split="train")
  else:
    source = data_lib.get_source(args.dataset, "train", data_dir=args.data_dir)
  n = len(source) if args.max_examples <= 0 else min(args.max_examples, len(source))
  texts = [t.decode("utf-8") if isinstance(t, bytes) else t
           for t in (r[args.text_key] for r in source.__getitems__(list(range(n))))]
  start = time.time()
  model = data_lib.train_sentencepiece(
      texts, args.out, args.vocab_size, model_type=args.model_type, seed=args.seed
  )
  tokenizer = data_lib.SentencePieceTokenizer(model)
  sample = "".join(texts[:2000])
  ids = tokenizer.encode(sample)
  assert tokenizer.decode(ids) == sample, "SentencePiece round trip failed"
  bytes_per_token = float(np.sum(tokenizer.token_bytes()[ids])) / max(len(ids), 1)
  print(f"Trained on {n} {args.dataset} examples in {time.time() - start:.1f}s: {model}")
  print(f"vocab_size={tokenizer.vocab_size}, {bytes_per_token:.2f} bytes/token")
  print(f"tokenizer spec: sentencepiece:{model}")
  return model


if __name__ == "__main__":
  from fedjax_lm import cpu  # pylint: disable=g-import-not-at-top
  cpu.apply_defaults()
  main()
