"""Merge policies: how islands and the global copy meet around the exchange, one module each
behind the small interface of :class:`mix.Mix` (``start``, ``at_send``, ``at_receive``,
``at_outer``, ``merged``; ``late`` for a delayed policy), which the stages of
:mod:`fedjax_lm.engine.stages` call. A policy owns its state (NamedTuples in its module).

A new policy is its module and one line in ``REGISTRY`` (when the config selects it, how to
build it); the shared contract test (``tests/test_contract.py``) runs every configured variant.
"""

from __future__ import annotations

from fedjax_lm.engine.merges import delayed
from fedjax_lm.engine.merges import eager
from fedjax_lm.engine.merges import mix
from fedjax_lm.engine.merges import noloco

Mix = mix.Mix

# name -> (does ``config.outer`` select it?, build it from ``config.outer``); first match wins
REGISTRY = {
    "noloco": (lambda oc: oc.get("gossip", "none") == "noloco",
               lambda oc: noloco.NoLoCo(noloco.gamma_ratio(oc))),
    "delayed": (lambda oc: oc.delay != "none", lambda oc: delayed.Delayed(oc.delay)),
    "eager": (lambda oc: bool(oc.eager), lambda oc: eager.Eager(float(oc.mixing))),
    "mix": (lambda oc: True, lambda oc: mix.Mix(float(oc.mixing))),
}


def from_config(oc) -> mix.Mix:
  """The merge policy ``config.outer`` selects."""
  return next(build(oc) for selects, build in REGISTRY.values() if selects(oc))
