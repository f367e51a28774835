"""NoLoCo on Shakespeare (Kolehmainen et al. 2025, arXiv 2506.10911): M=4 islands, one device
each (4 local processes), H=50, 1,000 steps; no all-reduce.

Per island m at each sync (every H inner AdamW steps), paired with one random peer j:

  Delta_m = phi_m - theta_m                                   (phi_m: the island's outer copy)
  delta_m = a delta_m - b (Delta_m + Delta_j) / 2 - c (phi_m - (phi_m + phi_j) / 2)
  phi_m   = phi_m + delta_m ;  theta_m = phi_m

(``fedjax_lm/engine/merges/noloco.py``: the pairing, the one-payload exchange by ``ppermute``
over the island axis, and what is left out.)

| hyper-parameter      | value here                         | the authors' 100M C4 run          |
|----------------------|------------------------------------|-----------------------------------|
| replicas (M), group  | 4, pairs                           | 4 data-parallel, groups of 2      |
| sync every (H)       | 50                                 | 50                                |
| outer step           | heavy-ball SGD, lr b 0.7,          | the same (their code's "Nesterov" |
|                      | momentum a 0.5, pull c = b (0.7)   | is heavy-ball; c = b)             |
| inner optimizer      | AdamW lr 3e-3, cosine (this repo's | Adam lr 6e-4                      |
|                      | DiLoCo config)                     |                                   |
| batch per island     | 8 x 256 bytes (32 rows a step, as  | 128 sequences                     |
|                      | the DiLoCo config)                 |                                   |
| model / steps        | Shakespeare byte LM, 1,000 steps   | ~100M LLaMA, C4                   |

Sources: the paper's abstract (arxiv.org/html/2506.10911v1; the body was not readable from
this workplace) and the authors' public code and configs (jkolehm/noloco:
``src/noloco/sparse_optimizer_c.py``, ``configs/no_reduce_exp/C4/c4_noloco_mean_100m_8.yaml``:
``number_of_local_steps: 50, local_group_size: 2, outer_lr: 0.7, outer_momentum: 0.5,
lr: 6e-4``). The pipeline-stage activation routing of the paper is not modelled (no pipeline
here). With M = 2 NoLoCo is DiLoCo with the same outer step (``tests/test_noloco.py``).
"""

from configs import shakespeare_diloco


def get_config():
  c = shakespeare_diloco.get_config()  # (the model, data, steps and evals)
  c.unlock()
  c.islands.num = 4
  c.outer.gossip = "noloco"
  c.outer.optimizer = "sgd"  # heavy-ball (outer.nesterov False), the authors' outer step
  c.outer.hparams_for = "sgd"  # (lr 0.7, momentum 0.5: the DiLoCo config's, the authors')
  c.data.batch_size = 8
  c.mesh.island = 4
  c.mesh.data = 1
  c.lock()
  return c
