"""A 1.06B-parameter DiLoCo run on C4 for two GPU nodes (compiled on an emulated mesh, not trained).

| hyper-parameter      | value                                        |
|----------------------|----------------------------------------------|
| model                | 18 layers, d=2048, 16 heads x 128, SwiGLU 5632, vocab 32768 (1.06B params) |
| tokens               | SentencePiece 32k, sequences of 1024         |
| islands (M)          | 2 (two 8-GPU nodes; TPU: two v5p-32 slices)  |
| in-island mesh       | fsdp 8 (16 devices in all)                   |
| batch per island     | 64 x 1024 tokens (8 rows per device)         |
| inner optimizer      | AdamW, lr 3e-4, warm-up 2000, cosine to 10%  |
| outer optimizer      | DiLoCo: SGD + Nesterov, lr 0.7, momentum 0.9 |
| sync every (H)       | 500 inner steps                              |
| steps                | 80,000 (~10.5B tokens, ~10 tokens per param) |

There is no activation recomputation or gradient accumulation in this codebase, so the batch per
device is what fits an 80 GB H100: 8 rows of 1024 compile to 45.3 GiB per device, 16 rows to
87.7 GiB, on the emulated mesh; see
``experiments/results/scale/summary.md`` for the compiled memory per device, GPU and TPU
layouts). TPU layout (two v5p-32 slices, 16 chips of 95 GB each):
``--config.mesh.data=2 --config.data.batch_size=128``.

Compile it (and read XLA's memory per device) without a cluster:

    python -m experiments.bench.scale compile --config configs/c4_1b.py --devices 16

On a cluster, as ``configs/c4_150m.py``: ``--config.data.tokenizer=sentencepiece:PATH``, C4
prepared as array_record in ``--config.data.data_dir``; one process per host.
"""

from configs import c4_150m


def get_config():
  """c4_150m's recipe (data, tokenizer, DiLoCo outer, H, schedule shape) at 1B."""
  c = c4_150m.get_config()
  c.unlock()
  c.total_steps = 80_000
  c.eval_every = 2000
  c.eval_batch_size = 64
  c.inner.learning_rate = 3e-4
  c.inner.warmup_steps = 2000
  c.data.batch_size = 64
  c.model.update(dict(num_layers=18, embed_dim=2048, num_heads=16, num_kv_heads=16,
                      head_dim=128, mlp_dim=5632))
  c.mesh.update({"island": 2, "data": 1, "fsdp": 8, "tensor": 1})
  c.lock()
  return c
