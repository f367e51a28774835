"""DiLoCo on Shakespeare: M=2 islands x 2 devices (4 local processes), H=50.

| hyper-parameter      | value                      |
|----------------------|----------------------------|
| islands (M)          | 2, one per island-axis slot |
| devices per island   | 2 (data parallel)          |
| inner optimizer      | AdamW, lr 3e-3, cosine     |
| outer optimizer      | SGD + Nesterov, lr 0.7, momentum **0.5** (paper: 0.9) |
| sync every (H)       | 50 inner steps             |
| batch per island     | 16 x 256 bytes             |

FedAvg / Local SGD on the same setup: ``--config.outer.optimizer=fedavg``.

Outer momentum: DiLoCo (Douillard et al. 2023) uses 0.9 over 128+ outer steps. This run has 5:
with 0.9 it ends 10.9% behind DDP, with 0.5 5.0% (``python -m experiments.compare --set tuning
--simulate``; ``experiments/results/tuning/summary.md``). The paper's value:
``--config.outer.momentum=0.9``.
"""

from fedjax_lm import config_lib


def get_config():
  c = config_lib.base_config()
  c.algorithm = "islands"
  c.islands.num = 2
  c.outer.optimizer = "diloco"
  c.outer.sync_every = 50
  c.outer.learning_rate = 0.7
  c.outer.momentum = 0.5  # tuned at this scale (5 outer steps); the paper's 0.9 is worse here
  c.outer.hparams_for = "diloco"  # --config.outer.optimizer=fedavg runs FedAvg's own lr 1
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
