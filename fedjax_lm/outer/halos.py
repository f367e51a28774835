"""HALoS (Kim et al., ICML 2025, "HALoS: Hierarchical Asynchronous Local SGD over Slow Networks
for Geo-Distributed Large Language Model Training", arXiv 2506.04531): the two server tiers'
state and updates, as pure functions.

Workers (islands) are grouped into R regions; each region has a local parameter server (LPS),
and one global parameter server (GPS) sits above them:

    worker w (region r): pull theta_r, H inner steps, send delta = start - end   (fast link)
    LPS r, on each delta:  theta_r <- DN_l(theta_r, delta)         (Delayed Nesterov, lr_l,
                                                                    beta_l, every N_l)
           after K deltas since its last merge: send Delta = ref_r - theta_r to the GPS and
           keep serving its workers meanwhile                      (slow link)
    GPS, on each Delta:    Theta <- DN_g(Theta, Delta), returned to LPS r
    LPS r, on Theta:       theta_r <- (1 - alpha) theta_r + alpha Theta ;  ref_r <- theta_r

Written from the authors' code (utnslab/halos: ``ps.py``, ``opt.py``'s DelayedNesterov,
``simulation/exec_halos.py``) and a public summary of the paper's Algorithm 1 (the paper's body
was not readable from this workplace). Their run script's settings are the defaults here:
K = 32, alpha = 0.25, LPS Delayed Nesterov lr 0.2 x 16 = 3.2 (per arrival 0.2), beta 0.9, every
16; GPS lr 0.15 x 2 = 0.3, beta 0.5, every 2; H = 8; 4 regions x 4 workers. Both tiers'
Delayed Nesterov is :func:`fedjax_lm.outer.delayed.delayed_nesterov` (the authors' with c = 0).

Identities (``tests/test_halos.py``): one region with K = M, alpha = 1, an LPS of lr 1 / M,
beta 0, every 1, and a GPS of every 1 is DiLoCo (Nesterov lr_g, beta_g on the mean of a round).
The event-driven deployment on a timing model is :mod:`fedjax_lm.hierarchy`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lm.outer import delayed

# outer.halos_<name> (the authors' run_halos.sh)
DEFAULTS = {"regions": 0, "k": 32, "alpha": 0.25, "local_lr": 3.2, "local_momentum": 0.9,
            "local_every": 16, "global_lr": 0.3, "global_momentum": 0.5, "global_every": 2,
            "wan_seconds": 0.0}
MODES = ("halos", "async", "sync")


class Settings(NamedTuple):
  regions: int
  k: int
  alpha: float
  local_lr: float
  local_momentum: float
  local_every: int
  global_lr: float
  global_momentum: float
  global_every: int
  wan_seconds: float  # one way, one param-sized message between an LPS and the GPS

  @classmethod
  def from_config(cls, outer_cfg) -> "Settings":
    return cls(**{k: type(v)(outer_cfg[f"halos_{k}"]) for k, v in DEFAULTS.items()})

  def local_tx(self) -> optax.GradientTransformation:
    return delayed.delayed_nesterov(self.local_lr, self.local_momentum, self.local_every)

  def global_tx(self) -> optax.GradientTransformation:
    return delayed.delayed_nesterov(self.global_lr, self.global_momentum, self.global_every)


def check(s: Settings, num_islands: int) -> str | None:
  """What is wrong with the settings for M islands, or None."""
  if s.regions < 1 or num_islands % s.regions:
    return (f"outer.halos_regions={s.regions} must be >= 1 and divide islands.num="
            f"{num_islands} (each region's LPS serves M / R workers)")
  if s.k < 1 or s.local_every < 1 or s.global_every < 1:
    return "outer.halos_k, halos_local_every and halos_global_every must be >= 1"
  if not 0.0 <= s.alpha <= 1.0:
    return f"outer.halos_alpha={s.alpha} must be in [0, 1]"
  if s.wan_seconds < 0:
    return f"outer.halos_wan_seconds={s.wan_seconds} must be >= 0"
  return None


class Region(NamedTuple):
  """One LPS: its params, its Delayed Nesterov state, the params at its last merge (what its
  next push is measured from)."""
  params: Any
  opt: Any
  reference: Any


def region_init(tx: optax.GradientTransformation, params: Any) -> Region:
  return Region(params, tx.init(params), params)


def region_apply(tx: optax.GradientTransformation, region: Region, delta: Any) -> Region:
  """A worker's pseudo-gradient ``delta = start - end`` through the LPS's optimizer."""
  updates, opt = tx.update(delta, region.opt, region.params)
  return region._replace(params=optax.apply_updates(region.params, updates), opt=opt)


def region_outgoing(region: Region) -> Any:
  """What the LPS sends the GPS: ``Delta = ref - theta`` (its progress since the last merge)."""
  return jax.tree.map(jnp.subtract, region.reference, region.params)


def region_merge(region: Region, global_params: Any, alpha: float) -> Region:
  """The GPS's params arrived: ``theta <- (1 - alpha) theta + alpha Theta``, the new reference."""
  params = jax.tree.map(lambda p, g: (1.0 - alpha) * p + alpha * g, region.params,
                        global_params)
  return region._replace(params=params, reference=params)


def global_apply(tx: optax.GradientTransformation, params: Any, opt: Any,
                 delta: Any) -> tuple[Any, Any]:
  """A region's ``Delta`` through the GPS's optimizer: (params, opt)."""
  updates, opt = tx.update(delta, opt, params)
  return optax.apply_updates(params, updates), opt
