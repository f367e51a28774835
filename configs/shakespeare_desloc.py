"""DES-LOC on Shakespeare: the DiLoCo setup (M=2, H=50, 1,000 steps) with the inner AdamW's
moments averaged over the islands on the paper's recommended periods.

| period                         | steps | averages in 1,000 steps       |
|--------------------------------|-------|-------------------------------|
| K_x params (``outer.sync_every``, DiLoCo's Nesterov outer step) | 50 | 20 |
| K_u first moment (``outer.desloc_mu_every``) | 150 = 3 K_x | 6 (150 ... 900) |
| K_v second moment (``outer.desloc_nu_every``) | 300 = 6 K_x | 3 (300, 600, 900) |

Each average sends one float32 copy of the moment (the size of the params), so an island sends
29 param-sized payloads against DiLoCo's 20 (``island_bytes``). Not yet measured at this scale.

Iacob et al. 2025 (arXiv 2505.22549), ``fedjax_lm/engine/desloc.py``. The paper's box averages
the params plainly: ``--config.outer.optimizer=fedavg``; moments never averaged (DiLoCo):
``--config.outer.desloc_mu_every=0 --config.outer.desloc_nu_every=0``.
"""

from configs import shakespeare_diloco


def get_config():
  c = shakespeare_diloco.get_config()
  c.unlock()
  c.outer.desloc_mu_every = 3 * c.outer.sync_every
  c.outer.desloc_nu_every = 6 * c.outer.sync_every
  c.lock()
  return c
