"""DDP baseline for ``shakespeare_diloco.py``: the same 2 groups x 2 devices and global batch
(2 x 16 x 256 bytes), gradients averaged across the groups every step; ``island_bytes`` counts
the gradient bytes crossing between the groups."""

from fedjax_lm import config_lib


def get_config():
  c = config_lib.base_config()
  c.algorithm = "ddp"
  c.islands.num = 2
  c.total_steps = 250
  c.log_every = 25
  c.eval_every = 50
  c.checkpoint_every = 50
  c.data.batch_size = 16
  c.data.partition = "iid"
  c.model.mlp_dim = 384
  c.mesh.island = 2
  c.mesh.data = 2
  c.launch.processes = 4
  c.lock()
  return c
