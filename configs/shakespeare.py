"""Default: a 1M-param byte-level transformer on Shakespeare, data parallel over 4 processes.

Runs on a 2-core laptop CPU in a few minutes (1 island x 4 devices, one CPU device per process).

  python -m experiments.train --config configs/shakespeare.py --workdir runs/shakespeare
"""

from fedjax_lm import config_lib


def get_config():
  c = config_lib.base_config()
  c.total_steps = 300
  c.log_every = 25
  c.eval_every = 100
  c.checkpoint_every = 50
  c.inner.learning_rate = 3e-3
  c.inner.warmup_steps = 50
  c.data.seq_len = 256
  c.data.batch_size = 16  # rows per step (one island)
  c.model.mlp_dim = 384
  c.mesh.data = -1
  c.launch.processes = 4
  c.lock()
  return c
