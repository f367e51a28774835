"""Islands of different sizes, merged by tokens (Decoupled DiLoCo, arXiv 2604.21428): the DiLoCo
config as decoupled island jobs, island 0 on 2 devices with 24 rows a step, island 1 on one
device with 8, and a syncer that weighs each round's pseudo-gradients 3 : 1 by the tokens each
island processed (``fedjax_lm/decoupled/tokens.py``). The same 32 rows a step in all as the
DiLoCo config's 2 x 16, so the runs compare at equal tokens and equal bytes.

| hyper-parameter      | value here                              | the paper                         |
|----------------------|-----------------------------------------|-----------------------------------|
| learners (M)         | 2 island jobs + a syncer                | 8 learners + a syncer             |
| learner sizes        | 2 devices x 12 rows, 1 device x 8 rows  | different chip counts / batches   |
| merge                | sum_k w_k delta_k / sum_k w_k,          | token-weighted (tokens processed) |
|                      | w_k = rows_k x seq_len x H (3 : 1)      |                                   |
| outer / inner / H    | the DiLoCo config's (Nesterov 0.7 / 0.5,| Nesterov outer, AdamW inner       |
|                      | AdamW 3e-3, H = 50), 1,000 steps        |                                   |

The unweighted mean on the same islands: ``--config.outer.merge=mean``. Source: the paper's
abstract and a public summary of its merge rule (the body was not readable from this
workplace); its quorum and grace window are ``outer.quorum`` / ``round_timeout_seconds``.
"""

from configs import shakespeare_diloco


def get_config():
  c = shakespeare_diloco.get_config()  # (the model, data, steps, evals and outer step)
  c.unlock()
  c.launch.mode = "decoupled"
  c.islands.devices = "2,1"
  c.islands.batch_sizes = "24,8"
  c.outer.merge = "tokens"
  c.mesh.island = 1
  c.mesh.data = -1
  c.lock()
  return c
