"""Reference DiLoCo: the oracle the engine must equal, written from the paper in jax.numpy.

DiLoCo (Douillard et al. 2023, arXiv 2311.08105), Algorithm 1, with the engine's conventions
and no code from the engine or optax. Every step names the stage of
``fedjax_lm/engine/stages.py`` that computes it (``tests/test_reference.py`` checks they agree):

    for outer step t = 1 .. T/H:
      for each replica i = 1 .. M:
        1. theta_i = theta^{t-1}                        copy the global params   init / merge
        2. H inner AdamW steps on replica i's own shard  (its AdamW moments and  inner_step
           step count carry over from round to round)
        3. delta_i = theta^{t-1} - theta_i              the pseudo-gradient      encode
      4. delta = mean_i delta_i                          all-reduce               reduce
         (weighted: sum_i w_i delta_i / sum_i w_i, w_i the tokens replica i processed:
         Decoupled DiLoCo's token-weighted merge, arXiv 2604.21428; the decoupled syncer)
      5. theta^t = OuterOpt(theta^{t-1}, delta)          Nesterov momentum SGD    outer_step

The inner AdamW is ``steps.inner_optimizer``'s: learning rate warmed up linearly from 0 then
cosine-decayed to ``min_lr_ratio`` of the peak over ``total_steps``, global-norm gradient
clipping first, ``eps`` 1e-8 outside the square root, weight decay on every top-level param
whose name lacks "norm". The outer step is ``optax.sgd(lr, momentum, nesterov=True)``:
``m <- delta + mu m; theta <- theta - lr (delta + mu m)``; momentum 0 is SGD (lr 1: FedAvg,
the mean of the replicas). When ``H`` does not divide the step count the last round is short
(the engine's clock flushes at the last step). Plain DiLoCo only: one fragment, no overlap,
codec or drop-out.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class AdamW(NamedTuple):
  """The inner optimizer's hyper-parameters, as ``config.inner`` names them."""
  learning_rate: float
  total_steps: int
  warmup_steps: int = 0
  min_lr_ratio: float = 1.0
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.0
  grad_clip: float = 0.0  # 0: no clipping
  eps: float = 1e-8

  @classmethod
  def from_config(cls, inner_cfg, total_steps: int) -> "AdamW":
    return cls(**{k: inner_cfg[k] for k in cls._fields if k in inner_cfg},
               total_steps=int(total_steps))


def learning_rate(h: AdamW, k: int) -> float:
  """Inner step k's (0-based) learning rate: linear warm-up from 0, then cosine decay."""
  warmup = min(h.warmup_steps, max(h.total_steps - 1, 0))
  if k < warmup:
    return h.learning_rate * k / warmup
  decay_steps = max(h.total_steps, warmup + 1) - warmup
  cosine = 0.5 * (1 + math.cos(math.pi * min(k - warmup, decay_steps) / decay_steps))
  return h.learning_rate * ((1 - h.min_lr_ratio) * cosine + h.min_lr_ratio)


def adamw_step(h: AdamW, k: int, params: dict, grads: dict, mu: dict, nu: dict):
  """Inner step k (0-based) of one replica: (params, mu, nu) after it."""
  if h.grad_clip > 0:
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    grads = jax.tree.map(lambda g: jnp.where(norm < h.grad_clip, g, g / norm * h.grad_clip),
                         grads)
  mu = jax.tree.map(lambda m, g: (1 - h.b1) * g + h.b1 * m, mu, grads)
  nu = jax.tree.map(lambda v, g: (1 - h.b2) * g * g + h.b2 * v, nu, grads)
  lr, decay = learning_rate(h, k), lambda name: h.weight_decay * ("norm" not in name)
  step = lambda name: lambda p, m, v: p - lr * (
      (m / (1 - h.b1 ** (k + 1))) / (jnp.sqrt(v / (1 - h.b2 ** (k + 1))) + h.eps)
      + decay(name) * p)
  return {n: jax.tree.map(step(n), params[n], mu[n], nu[n]) for n in params}, mu, nu


def diloco(loss_fn: Callable, params: dict, batches: Any, *, H: int, inner: AdamW,
           outer_lr: float = 0.7, outer_momentum: float = 0.9,
           weights: Any = None) -> tuple[dict, jax.Array]:
  """DiLoCo over ``batches`` (leaves ``[M, steps, ...]``: replica i's step-k batch at
  ``[i, k]``; or a list, replica i's batches with leaves ``[steps, ...]``, so replicas may
  differ in batch size) from ``params`` (a dict); ``loss_fn(params, batch)``. ``weights``:
  replica i's weight in step 4 (None: the plain mean). Returns the global params after the
  last outer step and every inner step's loss, ``[steps, M]``."""
  if not isinstance(batches, (list, tuple)):
    batches = [jax.tree.map(lambda b, i=i: b[i], batches)
               for i in range(jax.tree.leaves(batches)[0].shape[0])]
  num, total = len(batches), jax.tree.leaves(batches[0])[0].shape[0]
  weights = [1.0] * num if weights is None else [float(w) for w in weights]
  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  zeros = lambda: jax.tree.map(jnp.zeros_like, params)
  theta, momentum = params, zeros()
  moments = [(zeros(), zeros()) for _ in range(num)]
  losses = [[] for _ in range(num)]
  for start in range(0, total, H):  # outer step t
    deltas = []
    for i in range(num):  # replica i
      theta_i, (mu, nu) = theta, moments[i]  # 1. copy the global params
      for k in range(start, min(start + H, total)):  # 2. inner AdamW steps on its own shard
        loss, grads = grad_fn(theta_i, jax.tree.map(lambda b: b[k], batches[i]))
        theta_i, mu, nu = adamw_step(inner, k, theta_i, grads, mu, nu)
        losses[i].append(loss)
      moments[i] = (mu, nu)
      deltas.append(jax.tree.map(jnp.subtract, theta, theta_i))  # 3. pseudo-gradient
    delta = jax.tree.map(  # 4. all-reduce: the (weighted) mean
        lambda *d: sum(w * x for w, x in zip(weights, d)) / sum(weights), *deltas)
    momentum = jax.tree.map(lambda m, d: d + outer_momentum * m, momentum, delta)  # 5. Nesterov
    theta = jax.tree.map(lambda x, d, m: x - outer_lr * (d + outer_momentum * m),
                         theta, delta, momentum)
  return theta, jnp.asarray(losses).T
