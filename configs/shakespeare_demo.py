"""DeMo / DisTrO on Shakespeare (Peng et al. 2024, arXiv 2411.19870), at Psyche's run settings.

The method, per island r at every step (H = 1; H > 1 runs too, syncing a pseudo-gradient):

  delta_r = global - local_r                 (one inner SGD step: lr_t x the clipped gradient)
  e_r     = beta e_r + delta_r               (DeMo's decoupled momentum = error feedback)
  q_r     = top-k DCT coefficients of e_r    (per 64 x 64 tile of the flat vector)
  e_r     = e_r - IDCT(q_r)                  (full precision, though only signs are sent)
  Q       = IDCT(mean over r of sign(q_r))   (1-bit signs, decoded +-1)
  global  = global - lr sign(Q)              (signum; the islands restart from global)

| hyper-parameter     | value here                           | Psyche (llama2-20m configs) / paper |
|---------------------|--------------------------------------|-------------------------------------|
| workers (M), H      | 2 islands, 1                         | data-parallel clients, 1            |
| DCT                 | 64 x 64 tiles of the flat vector     | 64 x 64 tiles of each 2-D weight,   |
|                     | (runs of 64 consecutive values)      | 64-value runs of 1-D ones           |
| top-k               | 8 of 4096 coefficients per tile      | 8 per tile (paper's OLMo: 32)       |
| values              | 1-bit signs, decoded +-1             | same (``quantize_1bit = true``)     |
| indices             | uint16 (2 B)                         | uint16 for 4096-coefficient tiles   |
| momentum decay beta | 0.999                                | 0.999                               |
| aggregation         | mean over the islands that sent      | each coefficient averaged over the  |
|                     |                                      | workers that kept it                |
| outer step          | sign-SGD, lr 3e-3 constant           | sign-SGD, lr 4e-4, cosine + warmup  |
| gradient into e     | inner SGD lr 1 x this repo's warmup  | lr_t x gradient                     |
|                     | and cosine schedule, clip 1          |                                     |
| model / steps       | Shakespeare byte LM, 1,000 steps     | 20M Llama 2 (Psyche), 300M / 1B     |
|                     |                                      | OLMo for 100B tokens (paper)        |

Bytes per step per island: 17 per 4096 values (8 x 2 B indices + 1 B of signs), 1/964 of
DDP's float32 gradient.

The sign step's lr is the DiLoCo config's AdamW lr, as the paper gave DeMo its AdamW baseline's
(4e-4). One check at the quick suite's size (``experiments/bench/suites.py``, 100 steps, one
seed): eval loss 2.557 at 3e-3, 3.301 at 1e-3, DDP 2.462.

Differences, and why: the DCT tiles are cut from the flat vector (the codec sees one flat
vector per fragment; a tile is a sub-matrix only where a weight's rows are 64 long); the
aggregation is the engine's mean, so a coefficient kept by one island counts half where the
authors' scatter-mean counts it whole (the exchange averages decoded, dense payloads and never
sees per-coefficient counts); the sign step's lr is constant (``outer.learning_rate`` takes no
schedule; the inner schedule still weights the gradients entering the momentum, as DeMo's
``lr_t g`` does); a kept coefficient that is exactly 0 is not sent (Psyche would decode it +1).
The module and its sources: ``fedjax_lm/codecs/demo.py``.
"""

from configs import shakespeare_diloco


def get_config():
  c = shakespeare_diloco.get_config()
  c.unlock()
  c.inner.optimizer = "sgd"  # one step: delta = lr_t x the clipped gradient (DeMo's lr g)
  c.inner.learning_rate = 1.0  # only its schedule matters: the outer step is a sign
  c.inner.momentum = 0.0
  c.outer.sync_every = 1
  c.outer.optimizer = "sign_sgd"
  c.outer.learning_rate = 3e-3
  c.outer.momentum = None
  c.outer.hparams_for = "sign_sgd"
  c.outer.compression = "demo"
  c.outer.demo_chunk = 64
  c.outer.demo_topk = 8
  c.outer.demo_2d = True
  c.outer.demo_sign = True
  c.outer.error_feedback = 0.999
  c.lock()
  return c
