"""Default, the README's first command: DiLoCo on Shakespeare, M=2 islands of one process each.

A 1M-param byte-level transformer; each island trains alone on its own iid share of the plays
(AdamW, 16 rows of 256 bytes a step) and every H=50 steps the islands average their
pseudo-gradients into an outer Nesterov step (lr 0.7, momentum 0.5, as
``shakespeare_diloco.py``): 300 steps, 6 syncs. One CPU device and one core per process, so it
runs on a 2-core CPU in a few minutes. The same method at its full size (2 devices per island,
1,000 steps): ``configs/shakespeare_diloco.py``.

  python -m experiments.train --config configs/shakespeare.py --workdir runs/shakespeare
"""

from fedjax_lm import config_lib


def get_config():
  c = config_lib.base_config()
  c.algorithm = "islands"
  c.islands.num = 2
  c.outer.optimizer = "diloco"
  c.outer.sync_every = 50
  c.outer.learning_rate = 0.7
  c.outer.momentum = 0.5  # tuned at this scale (configs/shakespeare_diloco.py)
  c.outer.hparams_for = "diloco"  # --config.outer.optimizer=fedavg runs FedAvg's own lr 1
  c.total_steps = 300
  c.log_every = 25
  c.eval_every = 100
  c.checkpoint_every = 50
  c.inner.learning_rate = 3e-3
  c.inner.warmup_steps = 50
  c.data.seq_len = 256
  c.data.batch_size = 16  # rows per island per step
  c.data.partition = "iid"
  c.model.mlp_dim = 384
  c.mesh.island = 2
  c.mesh.data = 1
  c.launch.processes = 2
  c.lock()
  return c
