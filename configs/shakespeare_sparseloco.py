"""SparseLoCo on Shakespeare (Sarfi et al. 2025, arXiv 2508.15706), M=2 as the DiLoCo setup.

| hyper-parameter      | value                                                      |
|----------------------|------------------------------------------------------------|
| islands (M), H       | 2, 15 (the paper's H)                                       |
| exchanged values     | chunked top-k: 1/32 of each 4096-value chunk (3.1%), 2-bit |
|                      | codes (sign + 2 magnitudes), uint16 indices                 |
| error feedback       | e <- 0.95 e + delta; send topk(e); e <- e - sent           |
| outer optimizer      | SGD lr 1, no momentum (error feedback plays that role)     |

Differences from the paper's code: values are averaged over all M islands (the paper's
formula), not only over the islands that selected a coordinate; the 2-bit grid is sign + the
chunk's smallest / largest kept magnitude, not 4 bins over mean +- 3 std.
"""

from configs import shakespeare_diloco


def get_config():
  c = shakespeare_diloco.get_config()
  c.unlock()
  c.outer.sync_every = 15
  c.outer.optimizer = "fedavg"
  c.outer.compression = "topk"
  c.outer.topk_fraction = 1 / 32
  c.outer.topk_chunk = 4096
  c.outer.topk_bits = 2
  c.outer.error_feedback = 0.95
  c.lock()
  return c
