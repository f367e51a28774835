"""Outer optimizers: plain ``optax.GradientTransformation`` s applied to the pseudo-gradient.

The pseudo-gradient ``delta = global - mean(islands)`` points *downhill-reversed* like a
gradient, so every optimizer here is used exactly as on gradients:
``updates, state = tx.update(delta, state, global); global = optax.apply_updates(global, updates)``.

=============== =========================================== ================================
name            transform                                   defaults
=============== =========================================== ================================
fedavg          SGD (Local SGD / FedAvg, McMahan et al.)     lr 1.0
diloco          SGD + Nesterov momentum (Douillard et al.)   lr 0.7, momentum 0.9
fedopt_adam     Adam server optimizer (Reddi et al. 2021)    lr 1e-2, b1 0.9, b2 0.99, eps 1e-3
fedopt_yogi     Yogi server optimizer (Reddi et al. 2021)    lr 1e-2, b1 0.9, b2 0.99, eps 1e-3
fedopt_adagrad  Adagrad server optimizer (Reddi et al.)      lr 1e-1, eps 1e-3
slowmo          heavy-ball SGD (SlowMo, Wang et al. 2020)    lr 1.0, momentum 0.5
sgd             SGD, momentum/nesterov from the config       lr 1.0, momentum 0
sign_sgd        x <- x - lr sign(delta) (DeMo's outer step)  lr 4e-4 (DeMo's OLMo runs)
heloco          DiLoCo's Nesterov on pseudo-gradients        lr 0.7, momentum 0.9,
                corrected against the momentum (HeLoCo)      outer.heloco_* (heloco.py)
=============== =========================================== ================================

SlowMo: with base lr gamma, slow lr alpha and slow momentum beta the paper's update is
``u <- beta u + delta / gamma; x <- x - alpha gamma u``. With ``v = gamma u`` that is
``v <- beta v + delta; x <- x - alpha v``: heavy-ball SGD on delta with lr alpha, momentum beta
(exact for a constant inner lr; with a schedule the paper rescales by the current gamma).

sign_sgd is DeMo's step (Peng et al. 2024, signum on the decoded mean; ``outer.compression=demo``
with ``outer.error_feedback`` as its momentum): every coordinate moves by lr against its sign.

``outer.clip_norm > 0`` chains global-norm clipping of the pseudo-gradient in front; any other
optax transform can be passed to :func:`fedjax_lm.engine.build_for_loss` directly (``outer_tx``).
"""

from __future__ import annotations

from typing import Callable

import optax

from fedjax_lm.outer import heloco as heloco_lib

_DEFAULTS = {
    "fedavg": {"learning_rate": 1.0},
    "diloco": {"learning_rate": 0.7, "momentum": 0.9},
    "fedopt_adam": {"learning_rate": 1e-2},
    "fedopt_yogi": {"learning_rate": 1e-2},
    "fedopt_adagrad": {"learning_rate": 1e-1},
    "slowmo": {"learning_rate": 1.0, "momentum": 0.5},
    "sgd": {"learning_rate": 1.0, "momentum": 0.0},
    "sign_sgd": {"learning_rate": 4e-4},
    "heloco": {"learning_rate": 0.7, "momentum": 0.9},
}


def fedavg(learning_rate: float = 1.0) -> optax.GradientTransformation:
  return optax.sgd(learning_rate)


def diloco(learning_rate: float = 0.7, momentum: float = 0.9) -> optax.GradientTransformation:
  return optax.sgd(learning_rate, momentum=momentum, nesterov=True)


def fedopt_adam(learning_rate=1e-2, b1=0.9, b2=0.99, eps=1e-3) -> optax.GradientTransformation:
  return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)


def fedopt_yogi(learning_rate=1e-2, b1=0.9, b2=0.99, eps=1e-3) -> optax.GradientTransformation:
  return optax.yogi(learning_rate, b1=b1, b2=b2, eps=eps)


def fedopt_adagrad(learning_rate=1e-1, eps=1e-3) -> optax.GradientTransformation:
  return optax.adagrad(learning_rate, initial_accumulator_value=0.0, eps=eps)


def slowmo(learning_rate: float = 1.0, momentum: float = 0.5) -> optax.GradientTransformation:
  return optax.sgd(learning_rate, momentum=momentum or None)


def sgd(learning_rate: float = 1.0, momentum: float = 0.0,
        nesterov: bool = False) -> optax.GradientTransformation:
  return optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov)


def sign_sgd(learning_rate: float = 4e-4) -> optax.GradientTransformation:
  return optax.sign_sgd(learning_rate)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "fedavg": fedavg, "diloco": diloco, "fedopt_adam": fedopt_adam, "fedopt_yogi": fedopt_yogi,
    "fedopt_adagrad": fedopt_adagrad, "slowmo": slowmo, "sgd": sgd, "sign_sgd": sign_sgd,
    "heloco": heloco_lib.heloco,
}


def resolved_hparams(cfg) -> dict:
  """learning_rate / momentum after filling the optimizer's defaults for unset (None) keys."""
  if cfg.optimizer not in OPTIMIZERS:
    raise ValueError(f"outer.optimizer={cfg.optimizer!r}: expected one of {sorted(OPTIMIZERS)}")
  if cfg.get("hparams_for") and cfg.hparams_for not in OPTIMIZERS:
    raise ValueError(f"outer.hparams_for={cfg.hparams_for!r}: expected '' or one of "
                     f"{sorted(OPTIMIZERS)}")
  out = dict(_DEFAULTS[cfg.optimizer])
  if ignored_hparams(cfg):
    return out
  for key in ("learning_rate", "momentum"):
    value = cfg.get(key)
    if value is not None:
      if key not in out:
        raise ValueError(f"outer.{key} is not used by outer.optimizer={cfg.optimizer!r}")
      out[key] = float(value)
  return out


def ignored_hparams(cfg) -> dict:
  """The config's learning_rate / momentum when they were set for another optimizer
  (``outer.hparams_for``) and so do not apply to ``outer.optimizer``; else {}."""
  tuned_for = cfg.get("hparams_for") or cfg.optimizer
  if tuned_for == cfg.optimizer:
    return {}
  return {k: cfg.get(k) for k in ("learning_rate", "momentum") if cfg.get(k) is not None}


def from_config(cfg) -> optax.GradientTransformation:
  """``config.outer`` -> outer transform (optionally with pseudo-gradient clipping)."""
  hparams = resolved_hparams(cfg)
  if cfg.optimizer == "sgd":
    hparams["nesterov"] = bool(cfg.nesterov)
  if cfg.optimizer == "heloco":
    hparams.update(heloco_lib.settings(cfg))
  tx = OPTIMIZERS[cfg.optimizer](**hparams)
  if cfg.clip_norm < 0:
    raise ValueError(f"outer.clip_norm={cfg.clip_norm} must be >= 0")
  if cfg.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(float(cfg.clip_norm)), tx)
  return tx
