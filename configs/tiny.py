"""A seconds-long smoke test: tiny model, 2 processes. Used by the tests and for debugging.

  python -m experiments.train --config configs/tiny.py --workdir runs/tiny
"""

from fedjax_lm import config_lib


def get_config():
  c = config_lib.base_config()
  c.total_steps = 8
  c.log_every = 1
  c.eval_every = 4
  c.checkpoint_every = 3
  c.eval_batch_size = 4
  c.eval_batches = 2
  c.inner.warmup_steps = 2
  c.data.seq_len = 32
  c.data.batch_size = 4
  c.model.update(dict(num_layers=2, embed_dim=32, num_heads=2, num_kv_heads=2, head_dim=16,
                      mlp_dim=64, max_len=64, vocab_size=258))
  c.launch.processes = 2
  c.lock()
  return c
