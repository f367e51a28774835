"""Delayed Nesterov (Liu et al. 2024, "Asynchronous Local-SGD Training for Language Modeling",
arXiv 2401.09135), the outer optimizer of asynchronous islands, as an optax transform.

Asynchronous islands send one pseudo-gradient at a time, so Nesterov momentum would move on
every single (possibly stale) arrival. Delayed Nesterov moves the momentum once per N arrivals:

    every arrival d:   x <- x - (lr / N) d ;  b <- b + d          (no momentum in between)
    every N-th:        m <- beta m + b / N ;  x <- x - lr beta m ;  b <- 0

With beta = 0 each arrival is a plain step of lr / N, so N arrivals add up to one FedAvg step on
their mean. When the N arrivals are the M islands' pseudo-gradients of one synchronous round
(N = M, all from the same global params), the N updates add up exactly to one outer Nesterov
step on their mean: ``x <- x - lr (beta m_new + mean)`` with ``m_new = beta m + mean``
(``tests/test_outer.py`` checks this identity). The paper's algorithm box was not available
offline here; this is written from its description of the method, and the identity above is the
property it is built to have.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class DelayedNesterovState(NamedTuple):
  momentum: Any
  buffer: Any
  count: jax.Array  # arrivals so far (int32)


def delayed_nesterov(learning_rate: float, momentum: float, every: int
                     ) -> optax.GradientTransformation:
  if every < 1:
    raise ValueError(f"outer.delay_every={every} must be >= 1")

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return DelayedNesterovState(zeros, zeros, jnp.int32(0))

  def update(delta, state, params=None):
    del params
    count = state.count + 1
    buffer = jax.tree.map(jnp.add, state.buffer, delta)
    due = count % every == 0
    new_m = jax.tree.map(lambda m, b: momentum * m + b / every, state.momentum, buffer)
    updates = jax.tree.map(
        lambda d, m: -(learning_rate / every) * d - jnp.where(due, learning_rate * momentum * m,
                                                              0.0), delta, new_m)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(due, n, o), new, old)
    return updates, DelayedNesterovState(
        keep(new_m, state.momentum), keep(jax.tree.map(jnp.zeros_like, buffer), buffer), count)

  return optax.GradientTransformation(init, update)
