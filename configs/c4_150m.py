"""A 150M-parameter DiLoCo run on C4 for a real cluster (not trained in CI; validated by tests).

| hyper-parameter      | value                                        |
|----------------------|----------------------------------------------|
| model                | 12 layers, d=768, 12 heads x 64, SwiGLU 2560, vocab 32768 (149M params) |
| tokens               | SentencePiece 32k, sequences of 1024         |
| islands (M)          | 2 (e.g. two 16-chip slices / two GPU nodes)  |
| in-island mesh       | data 2 x fsdp 8 (32 devices in all)          |
| batch per island     | 256 x 1024 tokens                            |
| inner optimizer      | AdamW, lr 4e-4, warm-up 1000, cosine to 10%  |
| outer optimizer      | DiLoCo: SGD + Nesterov, lr 0.7, momentum 0.9 |
| sync every (H)       | 500 inner steps                              |
| steps                | 30,000 (~15.7B tokens)                       |

Prepare C4 as array_record first (``tfds build c4/en --file_format=array_record``) and train a
tokenizer (``experiments/train_tokenizer.py`` or an existing 32k SentencePiece model); point the
config at both: ``--config.data.data_dir=DIR --config.data.tokenizer=sentencepiece:PATH``. One
process per host: ``--config.launch.mode=cluster``.

Offline, on one machine (no C4, no accelerator): ``local_c4`` is a C4-shaped TFDS dataset built
from the vendored corpus and read through the same TFDS + grain path; the 32k tokenizer is
trained on it; ~20 steps with one outer sync run on 16 emulated CPU devices (2 islands x fsdp 4
x tensor 2) at a reduced batch (measured figures: ``experiments/results/scale/summary.md``):

    python -m fedjax_lm.data.local_c4 --data_dir /tmp/scale/tfds
    python -m experiments.train_tokenizer --dataset local_c4 --data_dir /tmp/scale/tfds \
        --vocab_size 32768 --model_type bpe --out /tmp/scale/c4_32k
    python -m experiments.bench.scale run --config configs/c4_150m.py --devices 16 --set \
        data.name=local_c4 data.data_dir=/tmp/scale/tfds \
        data.tokenizer=sentencepiece:/tmp/scale/c4_32k.model \
        mesh.data=1 mesh.fsdp=4 mesh.tensor=2 data.batch_size=4 data.seq_len=256 \
        outer.sync_every=10 total_steps=20 inner.warmup_steps=2

The same overrides work as ``--config.KEY=VALUE`` for ``experiments.train``.
"""

from fedjax_lm import config_lib


def get_config():
  c = config_lib.base_config()
  c.algorithm = "islands"
  c.islands.num = 2
  c.outer.optimizer = "diloco"
  c.outer.sync_every = 500
  c.total_steps = 30_000
  c.log_every = 50
  c.eval_every = 1000
  c.eval_batch_size = 256
  c.eval_batches = 16
  c.checkpoint_every = 1000
  c.inner.learning_rate = 4e-4
  c.inner.warmup_steps = 1000
  c.inner.weight_decay = 0.1
  c.data.name = "c4/en"
  c.data.tokenizer = "sentencepiece:/data/tokenizers/c4_32k.model"
  c.data.seq_len = 1024
  c.data.batch_size = 256
  c.data.append_eos = True
  c.model.update(dict(vocab_size=32768, num_layers=12, embed_dim=768, num_heads=12,
                      num_kv_heads=12, head_dim=64, mlp_dim=2560, max_len=1024,
                      compute_dtype="bfloat16", scan_layers=True))
  c.mesh.update({"island": 2, "data": 2, "fsdp": 8, "tensor": 1})
  c.launch.mode = "cluster"
  c.lock()
  return c
