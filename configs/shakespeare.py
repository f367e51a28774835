"""Default: a 1M-param byte-level transformer on Shakespeare, data parallel over 2 processes.

Runs on a 2-core CPU in 2-5 minutes (1 island x 2 devices, one CPU device and one
core per process: measured 1.9x faster than 4 processes on 2 cores, see the README's speed
section).

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
  c.launch.processes = 2
  c.lock()
  return c
