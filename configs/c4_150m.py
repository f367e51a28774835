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
tokenizer (``experiments/train_tokenizer.py`` or an existing 32k SentencePiece model). One
process per host: ``--config.launch.mode=cluster``.
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
