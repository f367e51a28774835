"""HeLoCo (Al Asif et al. 2026, "HeLoCo: Efficient asynchronous low-communication training
under data and device heterogeneity", arXiv 2606.00271): each incoming (stale) pseudo-gradient
is corrected by its direction relative to the outer momentum, block by block, before the
outer optimizer's momentum update.

Per block b (here: one parameter leaf of the fragment the outer step owns), with m the outer
momentum before this update:

    u = d_b / |d_b|,  v = m_b / |m_b|,  c = u . v,  conf = |d_b| / (|d_b| + kappa |m_b| + eps)
    c >= c_ok:       d_b                                        (aligned: passes)
    c < 0:           d_b - beta c |d_b| v,     beta   = min(k_s (-c) conf, beta_max)
    0 <= c < c_ok:   |d_b| w / max(|w|, eps),  w = (1 - lam) u + lam v,
                                               lam    = min(k_d (1 - c) conf, 1)

Anti-aligned blocks lose part of their component against m (beta = 1 removes it); weakly
aligned ones turn toward m at their own norm. The paper keeps m as an average,
``m <- mu m + (1 - mu) G``; optax's Nesterov trace is its sum form ``t <- mu t + G``, so the
reference here is ``(1 - mu) t`` (the same vector while both see the same G), which keeps
kappa's meaning; the cosine does not depend on the scale. The corrected pseudo-gradient then
drives the wrapped outer optimizer unchanged (DiLoCo's Nesterov for ``outer.optimizer=heloco``:
:func:`heloco`; Delayed Nesterov for asynchronous islands: :func:`delayed_nesterov`), so
``c_ok = -1`` (everything passes) or ``k_s = k_d = 0`` is that optimizer exactly.

Choices of ours (the paper's body and hyper-parameter table were not readable from this
workplace; the rule above is from a public transcription of its equations and the project's
notes): a block whose pseudo-gradient or momentum is zero passes (no direction to compare:
the first outer step, or Delayed Nesterov before its first N arrivals); a block whose
correction strength is 0 passes bit for bit; blocks are whole leaves, so a stacked ``[L, ...]``
weight is one block over its L layers (with ``outer.fragments = L`` each fragment holds one
layer, and a block is one layer's tensor); no per-worker delay weight (the paper's rho = 1).
The defaults (``DEFAULTS``) are ours, not the paper's.

Where it applies: the mesh-axis ``outer.delay`` deployment (the outer step receives the mean
one round late, through the fragment's outer optax state: :func:`heloco` is that optax
transform) and the decoupled asynchronous syncer (:func:`delayed_nesterov`, the same
arguments as :func:`fedjax_lm.outer.delayed.delayed_nesterov` plus the settings). The norms
and dots run over a block's shards inside one island (the global copy is replicated over the
island axis): nothing crosses islands.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_lm.outer import delayed

# keep threshold, shrink strength and cap, turn strength, momentum weight, the small constant
DEFAULTS = {"c_ok": 0.2, "k_s": 1.0, "beta_max": 0.5, "k_d": 0.5, "kappa": 1.0, "eps": 1e-8}
KEYS = tuple(DEFAULTS)  # config keys outer.heloco_<name>


def settings(cfg) -> dict:
  """``config.outer`` -> the correction's keyword arguments (``outer.heloco_*``)."""
  return {k: float(cfg[f"heloco_{k}"]) for k in KEYS}


def check(s: dict) -> str | None:
  """The first bad setting as one line naming its config key, or None."""
  bad = {"c_ok": not -1.0 <= s["c_ok"] <= 1.0, "k_s": s["k_s"] < 0,
         "beta_max": not 0.0 <= s["beta_max"] <= 1.0, "k_d": s["k_d"] < 0,
         "kappa": s["kappa"] < 0, "eps": not s["eps"] > 0}
  want = {"c_ok": "in [-1, 1]", "k_s": ">= 0", "beta_max": "in [0, 1]", "k_d": ">= 0",
          "kappa": ">= 0", "eps": "> 0"}
  for k in KEYS:
    if bad[k]:
      return f"outer.heloco_{k}={s[k]} must be {want[k]}"
  return None


def correct_block(d: jax.Array, m: jax.Array, *, c_ok: float, k_s: float, beta_max: float,
                  k_d: float, kappa: float, eps: float) -> jax.Array:
  """One block's corrected pseudo-gradient (``m``: the reference momentum, paper scale)."""
  x, y = d.astype(jnp.float32), m.astype(jnp.float32)
  nd, nm = jnp.sqrt(jnp.sum(x * x)), jnp.sqrt(jnp.sum(y * y))
  live = (nd > 0) & (nm > 0)
  u = x / jnp.where(nd > 0, nd, 1.0)
  v = y / jnp.where(nm > 0, nm, 1.0)
  c = jnp.sum(x * y) / jnp.where(live, nd * nm, 1.0)
  conf = nd / (nd + kappa * nm + eps)
  beta = jnp.minimum(k_s * -c * conf, beta_max)
  shrunk = x - (beta * c * nd) * v
  lam = jnp.minimum(k_d * (1.0 - c) * conf, 1.0)
  w = (1.0 - lam) * u + lam * v
  turned = (nd / jnp.maximum(jnp.sqrt(jnp.sum(w * w)), eps)) * w
  strength = jnp.where(c < 0, beta, lam)
  out = jnp.where(c < 0, shrunk, turned)
  keep = ~live | (c >= c_ok) | (strength == 0)
  return jnp.where(keep, x, out).astype(d.dtype)


def correct(delta: Any, momentum: Any, **s) -> Any:
  """Every block (leaf) of ``delta`` corrected against the same leaf of ``momentum``."""
  return jax.tree.map(lambda d, m: correct_block(d, m, **s), delta, momentum)


def wrap(tx: optax.GradientTransformation, reference: Callable[[Any], Any], scale: float,
         **s) -> optax.GradientTransformation:
  """``tx`` fed with corrected pseudo-gradients; ``reference(state)`` reads the momentum
  ``tx`` keeps, ``scale`` brings it to the paper's average form. The state is ``tx``'s."""

  def update(delta, state, params=None):
    m = jax.tree.map(lambda t: scale * t, reference(state))
    return tx.update(correct(delta, m, **s), state, params)

  return optax.GradientTransformation(tx.init, update)


def heloco(learning_rate: float = 0.7, momentum: float = 0.9, **s
           ) -> optax.GradientTransformation:
  """``outer.optimizer=heloco``: DiLoCo's outer Nesterov on corrected pseudo-gradients."""
  s = {**DEFAULTS, **s}
  tx = optax.sgd(learning_rate, momentum=momentum, nesterov=True)
  return wrap(tx, lambda state: optax.tree_utils.tree_get(state, "trace"), 1.0 - momentum, **s)


def delayed_nesterov(learning_rate: float, momentum: float, every: int, **s
                     ) -> optax.GradientTransformation:
  """Asynchronous islands: :func:`fedjax_lm.outer.delayed.delayed_nesterov`'s arguments and
  state, each arrival corrected against its momentum (moved once per ``every`` arrivals)."""
  s = {**DEFAULTS, **s}
  tx = delayed.delayed_nesterov(learning_rate, momentum, every)
  return wrap(tx, lambda state: state.momentum, 1.0 - momentum, **s)
