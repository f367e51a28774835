"""DiLoCo on Shakespeare: M=2 islands x 2 devices (4 local processes), H=50.

| hyper-parameter      | value                      |
|----------------------|----------------------------|
| islands (M)          | 2, one per island-axis slot |
| devices per island   | 2 (data parallel)          |
| inner optimizer      | AdamW, lr 3e-3, cosine     |
| outer optimizer      | SGD + Nesterov, lr 0.7, momentum 0.9 |
| sync every (H)       | 50 inner steps             |
| batch per island     | 16 x 256 bytes             |

FedAvg / Local SGD on the same setup: ``--config.outer.optimizer=fedavg``.
"""

from fedjax_lm import config_lib


def get_config():
  c = config_lib.base_config()
  c.algorithm = "islands"
  c.islands.num = 2
  c.outer.optimizer = "diloco"
  c.outer.sync_every = 50
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
