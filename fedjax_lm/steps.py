"""Loss, inner optimizers and the single-island train / eval steps (pure functions).

Batches are dicts ``{"inputs", "targets": int32[..., T], "mask": float32[..., T]}``. The loss is
the mean cross-entropy per target token (for the byte tokenizer that is nats/byte); evaluation
reports nats per *text byte* using the tokenizer's ``token_bytes`` table, so byte and
SentencePiece runs compare on one scale.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_lm import health
from fedjax_lm import model as model_lib

INNER_OPTIMIZERS = ("adamw", "sgd", "muon")


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
  """Linear warm-up then cosine decay to ``min_lr_ratio`` of the peak, over ``total_steps``."""
  warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else cfg.learning_rate, peak_value=cfg.learning_rate,
      warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.min_lr_ratio)


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices only: not on norm scales."""
  return {k: ("norm" not in k) for k in params}


def muon_dimensions(logical_axes: Any) -> Any:
  """Muon's view of each parameter (``optax.contrib.MuonDimensionNumbers``, or None for the
  AdamW path): matrices stacked over ``layers`` are orthogonalised per layer, input axes
  reduced; embeddings, the unembedding and norm scales take AdamW updates (as in Muon / MuLoCo
  practice). A matrix's output is its trailing ``embed`` axis (``wo``, ``w_down``) or else
  everything after its leading ``embed`` input axis (``wq``, ``w_gate``, ...)."""
  from optax.contrib import MuonDimensionNumbers  # pylint: disable=g-import-not-at-top

  def dims(names):
    if not names or names[0] != "layers" or len(names) < 3:
      return None
    if names[-1] == "embed":
      return MuonDimensionNumbers(tuple(range(1, len(names) - 1)), (len(names) - 1,))
    return MuonDimensionNumbers((1,), tuple(range(2, len(names))))

  return jax.tree.map(dims, logical_axes, is_leaf=lambda x: isinstance(x, tuple))


def inner_optimizer(cfg, total_steps: int, muon_dims: Any = None) -> optax.GradientTransformation:
  """The per-island optimizer from ``config.inner`` (adamw | sgd | muon), with global-norm
  clipping. ``muon``: optax's Muon with ``consistent_rms=0.2`` (update RMS matched to AdamW's,
  so one learning rate and weight decay serve both paths); ``muon_dims`` from
  :func:`muon_dimensions` (None: optax's default, 2-D leaves only)."""
  lr = learning_rate_schedule(cfg, total_steps)
  if cfg.optimizer == "muon":
    from optax.contrib import muon  # pylint: disable=g-import-not-at-top
    opt = muon(lr, beta=cfg.b1, weight_decay=cfg.weight_decay, weight_decay_mask=_decay_mask,
               adam_b1=cfg.b1, adam_b2=cfg.b2, adam_weight_decay=cfg.weight_decay,
               muon_weight_dimension_numbers=muon_dims, consistent_rms=0.2)
  elif cfg.optimizer == "adamw":
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=1e-8, weight_decay=cfg.weight_decay,
                      mask=_decay_mask)
  elif cfg.optimizer == "sgd":
    opt = optax.sgd(lr, momentum=cfg.momentum or None, nesterov=False)
  else:
    raise ValueError(f"inner.optimizer={cfg.optimizer!r}: expected one of {INNER_OPTIMIZERS}")
  if cfg.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
  return opt


def token_losses(graphdef, params, batch, rows=None) -> tuple[jax.Array, jax.Array]:
  """Per-token negative log-likelihood (f32) and mask (``rows``: see ``model.Transformer``)."""
  logits = model_lib.apply(graphdef, params, batch["inputs"], rows)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
  return logz - target_logit, batch["mask"]


def mean_loss(graphdef, params, batch, rows=None) -> jax.Array:
  nll, mask = token_losses(graphdef, params, batch, rows)
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                    guard: bool = False) -> Callable:
  """(params, opt_state, batch) -> (params, opt_state, loss, ok) for ``loss_fn(params,
  batch)``; ``jax.vmap`` of this step over a leading dim is that many independent islands.
  ``guard``: a step whose loss, gradients or new params are not all finite is skipped
  (``ok`` False, params and optimizer state returned unchanged)."""

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    if not guard:
      return new_params, new_opt_state, loss, jnp.bool_(True)
    ok = health.all_finite((loss, grads, new_params))
    return (health.keep_if(ok, new_params, params),
            health.keep_if(ok, new_opt_state, opt_state), loss, ok)

  return step


def make_eval_step(graphdef, token_bytes: jax.Array) -> Callable:
  """(params, batch) -> [sum nll, sum target tokens, sum target text bytes]."""

  def step(params, batch):
    nll, mask = token_losses(graphdef, params, batch)
    nbytes = jnp.take(token_bytes, batch["targets"]) * mask
    return jnp.stack([jnp.sum(nll * mask), jnp.sum(mask), jnp.sum(nbytes)])

  return step
