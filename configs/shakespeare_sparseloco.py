"""SparseLoCo on Shakespeare (Sarfi et al. 2025, arXiv 2508.15706), at the paper's settings.

The method, per replica r at each sync (every H inner AdamW steps):

  delta_r = global - local_r                       (pseudo-gradient)
  e_r     = beta e_r + delta_r                     (error feedback; replaces outer momentum)
  send_r  = Q(TopK(e_r))                           (chunked top-k, 2-bit quantized)
  e_r     = e_r - send_r                           (what was sent leaves the accumulator)
  agg_j   = mean of send_r[j] over the r that kept j   (sparse aggregation; 0 if none did)
  global  = global - alpha agg                     (outer SGD, no momentum)

| hyper-parameter      | value here                          | paper's 512M run (authors' code) |
|----------------------|-------------------------------------|----------------------------------|
| replicas (M), H      | 2, 15                               | 8, 15                            |
| top-k                | 128 of each 4096-value chunk (3.1%) | 128 of each 64x64 tile (3.1%)    |
| chunks               | 4096 consecutive values of the flat | 64x64 tiles of each 2-D weight,  |
|                      | model vector                        | 64-value runs of 1-D ones        |
| quantizer            | 2 bits: 4 bins over mean +- 3 sd of | same, statistics per tensor      |
|                      | the chunk's kept values, each bin   |                                  |
|                      | decoded to its members' mean        |                                  |
| indices              | uint16 per kept value               | int64 (no index coding counted)  |
| error feedback beta  | 0.95                                | 0.95                             |
| aggregation          | per coordinate, over the replicas   | same (scatter-mean of every      |
|                      | that kept it                        | replica's kept values)           |
| outer optimizer      | SGD lr 1, no momentum               | SGD lr 1, no momentum            |
| inner optimizer      | this repo's DiLoCo config (AdamW    | AdamW lr 1e-3, wd 0.1, warmup    |
|                      | lr 3e-3, cosine)                    | 500, clip 1, 256 x 2048 tokens   |
| model / steps        | Shakespeare byte LM, 1,000 steps    | 512M LLaMA-style, DCLM, ~2.4k    |
|                      | (measured at 250: studies/sparseloco) |                                |

``outer.compression=topk``, ``outer.topk_quantizer=sigma``, ``outer.topk_aggregate=selected``
are this repository's names for the paper's quantizer and aggregation
(:mod:`fedjax_lm.codecs`, :func:`fedjax_lm.engine.links.exchange`).

Sources. Read directly: the paper's abstract and title page (arxiv.org/html/2508.15706v2:
"error feedback with Top-k sparsification and 2-bit quantization", "sparse aggregation can
actually improve model performance", 1-3% density). The body of the paper (its algorithm box,
hyper-parameter table and ablations) was NOT readable from this workplace; the algorithm above
follows a third-party rendering of the paper's update equations and the authors' public code
(tplr-ai/SparseLoCo, read through a public copy, QErywan/RobustDiLoCo:
``src/tplr/sparseloco.py`` and ``hparams/512M/sweeps/sparseloco.yaml``, whose values are the
right column). Where the two differ the code was followed: the third-party rendering averages
the sparse updates over all R replicas; the code averages each coordinate over the replicas
that selected it (``scatter_reduce(..., "mean", include_self=False)``), which is what the paper's
"sparse aggregation" names. The code also adds ``alpha delta`` (not ``delta``) to the
accumulator; at the paper's alpha = 1 the two are the same (and since top-k and the quantizer
are scale-equivariant, the code at alpha is this form at alpha^2).

Differences from the paper still left, and why: M = 2 (this repository's DiLoCo baseline, same
tokens and compute); chunks of the flat vector and per-chunk quantizer statistics (the codec
sees one flat float32 vector per fragment, cut into whole chunks so every device sends whole
blocks; 16 bytes of bin table per 128 kept values); uint16 indices (counted exactly in
``island_bytes``); the inner optimizer and model are this repository's Shakespeare setup (the
paper's 512M / DCLM recipe does not fit this model or machine).

Tuned at the quick-suite size: ``configs/shakespeare_sparseloco_tuned.py``;
measurements: ``experiments/studies/sparseloco/summary.md``.
"""

from configs import shakespeare_diloco


def get_config():
  c = shakespeare_diloco.get_config()
  c.unlock()
  c.outer.sync_every = 15
  c.outer.optimizer = "fedavg"  # optax.sgd(alpha): the outer step, no momentum
  c.outer.learning_rate = 1.0
  c.outer.momentum = None
  c.outer.hparams_for = "fedavg"
  c.outer.compression = "topk"
  c.outer.topk_fraction = 128 / 4096
  c.outer.topk_chunk = 4096
  c.outer.topk_bits = 2
  c.outer.topk_quantizer = "sigma"
  c.outer.topk_sigmas = 6.0
  c.outer.topk_aggregate = "selected"
  c.outer.error_feedback = 0.95
  c.lock()
  return c
