"""DDP baseline for ``shakespeare_diloco.py``: the same 2 groups x 2 devices, model, data and
global batch (2 x 16 x 256 bytes), but gradients averaged across the groups every step;
``island_bytes`` counts the gradient bytes crossing between the groups."""

from configs import shakespeare_diloco


def get_config():
  c = shakespeare_diloco.get_config()
  with c.unlocked():
    c.algorithm = "ddp"
  return c
