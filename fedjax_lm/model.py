"""Decoder-only transformer LM in Flax NNX.

Pre-norm blocks: RMSNorm -> causal multi-head attention with RoPE -> RMSNorm -> SwiGLU MLP.
Layer weights are stacked along a leading ``layers`` dimension; the forward pass unrolls the
layers (fastest here) or, with ``scan_layers``, scans over them so compile time does not grow
with depth. ``attention`` picks one of three formulations of the same function (the tests check
they agree); ``fused`` is the fast one on CPU (see ``python -m experiments.bench --suite step``), with
``hand_backward``: :func:`dense` and :func:`silu_glu` write their backward passes out so that
XLA:CPU transposes the narrow operands.

Every parameter carries its *logical* axis names in the ``axes`` metadata field
(``vocab, embed, heads, kv_heads, head_dim, mlp, layers``); :mod:`fedjax_lm.mesh` maps them
to mesh axes with the rules from the config. The model itself never names a mesh axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTIONS = ("fused", "einsum", "dot_product")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of the transformer."""

  vocab_size: int = 512
  num_layers: int = 4
  embed_dim: int = 128
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 32
  mlp_dim: int = 512
  max_len: int = 256
  rope_base: float = 10_000.0
  tie_embeddings: bool = False
  compute_dtype: str = "float32"  # "bfloat16" runs matmuls in bf16, keeps params/logits f32
  param_dtype: str = "float32"
  scan_layers: bool = False  # True: lax.scan over layers (compile time flat in depth)
  attention: str = "fused"  # fused | einsum (reference) | dot_product (jax.nn's)
  attention_block: int = 128  # fused: causal query-block size; 0 or not dividing T = one block
  # fused: QKV projected token-major, the weight gradients as x^T @ dy (`dense`), SwiGLU's
  # backward written out (`silu_glu`); False: autodiff's own order (the same function)
  hand_backward: bool = True

  @classmethod
  def from_config(cls, cfg) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(cfg.keys()) - fields
    if unknown:
      raise ValueError(f"Unknown model config keys: {sorted(unknown)}")
    out = cls(**dict(cfg))
    if out.num_heads % out.num_kv_heads:
      raise ValueError(f"model.num_heads={out.num_heads} is not a multiple of "
                       f"model.num_kv_heads={out.num_kv_heads}")
    if out.head_dim % 2:
      raise ValueError(f"model.head_dim={out.head_dim} must be even (RoPE rotates pairs)")
    if out.attention not in ATTENTIONS:
      raise ValueError(f"model.attention={out.attention!r}: expected one of {ATTENTIONS}")
    for name in ("compute_dtype", "param_dtype"):
      if getattr(out, name) not in DTYPES:
        raise ValueError(f"model.{name}={getattr(out, name)!r}: expected one of {list(DTYPES)}")
    return out


def _param(rngs: nnx.Rngs, init, shape, axes, dtype) -> nnx.Param:
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(init(rngs.params(), shape, dtype), axes=tuple(axes))


class Transformer(nnx.Module):
  """Token ids [..., T] -> logits [..., T, vocab] (float32)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    L, D, H, K, Dh, F = (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads,
                         cfg.head_dim, cfg.mlp_dim)
    dt = DTYPES[cfg.param_dtype]
    normal = jax.nn.initializers.normal
    scaled = lambda fan_in: jax.nn.initializers.normal(fan_in**-0.5)
    # Residual projections are scaled down by sqrt(2L) (GPT-2 style) for stable depth.
    out_scale = lambda fan_in: jax.nn.initializers.normal((fan_in * 2 * L) ** -0.5)
    ones = jax.nn.initializers.ones
    self.embed = _param(rngs, normal(1.0), (cfg.vocab_size, D), ("vocab", "embed"), dt)
    self.attn_norm = _param(rngs, ones, (L, D), ("layers", "embed"), dt)
    self.wq = _param(rngs, scaled(D), (L, D, H, Dh), ("layers", "embed", "heads", "head_dim"), dt)
    self.wk = _param(rngs, scaled(D), (L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), dt)
    self.wv = _param(rngs, scaled(D), (L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), dt)
    self.wo = _param(rngs, out_scale(H * Dh), (L, H, Dh, D), ("layers", "heads", "head_dim", "embed"), dt)
    self.mlp_norm = _param(rngs, ones, (L, D), ("layers", "embed"), dt)
    self.w_gate = _param(rngs, scaled(D), (L, D, F), ("layers", "embed", "mlp"), dt)
    self.w_up = _param(rngs, scaled(D), (L, D, F), ("layers", "embed", "mlp"), dt)
    self.w_down = _param(rngs, out_scale(F), (L, F, D), ("layers", "mlp", "embed"), dt)
    self.final_norm = _param(rngs, ones, (D,), ("embed",), dt)
    if not cfg.tie_embeddings:
      self.unembed = _param(rngs, scaled(D), (D, cfg.vocab_size), ("embed", "vocab"), dt)

  def __call__(self, tokens: jax.Array, rows: Any = None) -> jax.Array:
    """Logits of ``tokens [B, T]``. ``rows``: a sharding of the residual stream ``[B, T, D]``
    (its rows over the island's data-parallel devices), kept at every block's input; without
    it GSPMD may follow the embedding table's sharding and hold every row of the batch on each
    fsdp device (measured at c4_150m's cluster layout: 217 GiB per device instead of 31)."""
    cfg = self.cfg
    cdt = DTYPES[cfg.compute_dtype]
    keep = (lambda h: h) if rows is None else (
        lambda h: jax.lax.with_sharding_constraint(h, rows))
    x = keep(jnp.take(self.embed[...], tokens, axis=0).astype(cdt))
    fused = cfg.attention == "fused"
    project = dense if fused and cfg.hand_backward else jnp.tensordot
    with jax.ensure_compile_time_eval():  # a constant, so RoPE's tables are constants too
      positions = jnp.arange(tokens.shape[-1])
    layer_params = {name: getattr(self, name)[...] for name in
                    ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")}

    def block(h, p):
      h = h + _attention(rms_norm(h, p["attn_norm"]), p, positions, cfg)
      h = h + _swiglu(rms_norm(keep(h), p["mlp_norm"]), p, fused, cfg.hand_backward)
      return keep(h), None

    if cfg.scan_layers:
      x, _ = jax.lax.scan(block, x, layer_params)
    else:
      for i in range(cfg.num_layers):
        x, _ = block(x, {k: v[i] for k, v in layer_params.items()})
    x = rms_norm(x, self.final_norm[...])
    unembed = self.embed[...].T if cfg.tie_embeddings else self.unembed[...]
    if cfg.tie_embeddings:
      x = x * cfg.embed_dim**-0.5  # keep tied logits O(1) at init
    return project(x, unembed.astype(cdt), 1).astype(jnp.float32)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary embedding on the last dim of x [..., T, heads, Dh] (halves rotated, NeoX style)."""
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[:, None].astype(jnp.float32) * freqs  # [T, half]
  sin, cos = jnp.sin(angles)[:, None, :], jnp.cos(angles)[:, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def rope_heads_first(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """:func:`rope` for x [..., heads, T, Dh], with the half rotation [x1, x2] -> [-x2, x1] as a
  product with a signed permutation matrix (exact; faster than slice + concatenate on CPU)."""
  half = x.shape[-1] // 2
  # Constant positions give constant [T, Dh] tables; computed in the step, XLA fuses cos and
  # sin into their broadcast consumers and recomputes them for every batch row and head.
  with jax.ensure_compile_time_eval():
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[:, None].astype(jnp.float32) * freqs  # [T, half]
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
  eye, zero = jnp.eye(half, dtype=jnp.float32), jnp.zeros((half, half), jnp.float32)
  rotate_half = jnp.block([[zero, eye], [-eye, zero]])
  x32 = x.astype(jnp.float32)
  out = x32 * cos + jnp.einsum("...k,kj->...j", x32, rotate_half) * sin
  return out.astype(x.dtype)


def _attention(x, p, positions, cfg: ModelConfig):
  """Causal self-attention. ``einsum``: the reference formulation (token-major, separate
  projections); ``fused``: one Q|K|V projection, head-major layout, causal query blocks;
  ``dot_product``: ``jax.nn.dot_product_attention`` (cuDNN / fused kernels where present)."""
  if cfg.attention == "fused":
    return _attention_fused(x, p, positions, cfg)
  cdt = x.dtype
  q, k, v = (jnp.einsum("...td,dhk->...thk", x, p[w].astype(cdt)) for w in ("wq", "wk", "wv"))
  q, k = rope(q, positions, cfg.rope_base), rope(k, positions, cfg.rope_base)
  if cfg.attention == "dot_product":
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return jnp.einsum("...thk,hkd->...td", out, p["wo"].astype(cdt))
  groups = cfg.num_heads // cfg.num_kv_heads
  if groups > 1:
    k, v = jnp.repeat(k, groups, axis=-2), jnp.repeat(v, groups, axis=-2)
  logits = jnp.einsum("...qhk,...shk->...hqs", q, k).astype(jnp.float32) * cfg.head_dim**-0.5
  t = x.shape[-2]
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(cdt)
  out = jnp.einsum("...hqs,...shk->...qhk", probs, v)
  return jnp.einsum("...thk,hkd->...td", out, p["wo"].astype(cdt))


def _attention_fused(x, p, positions, cfg: ModelConfig):
  """The same function as the ``einsum`` path, laid out for speed: Q|K|V in one projection
  straight into [..., heads, T, Dh], the 1/sqrt(Dh) scale folded into the query weights (RoPE
  is linear); query block b attends only to keys up to its end, so the fully masked blocks
  above the diagonal are never computed; softmax's division is applied to the [.., q, Dh]
  output instead of the [.., q, keys] probabilities."""
  cdt = x.dtype
  H, K = cfg.num_heads, cfg.num_kv_heads
  wq = p["wq"] * jnp.asarray(cfg.head_dim**-0.5, p["wq"].dtype)
  # hand_backward: the projection token-major ([T, D] @ [D, 3 H Dh], XLA:CPU's fast layout),
  # then one transpose to head-major: 12% a step faster than projecting into [.., heads, T, Dh].
  hand = cfg.hand_backward
  if H == K:  # stacked on a new axis, so a sharded heads axis stays sharded
    w = jnp.stack([wq, p["wk"], p["wv"]], axis=1 if hand else 0).astype(cdt)
    qkv = (jnp.moveaxis(jnp.einsum("...td,dshk->...tshk", x, w), -4, -2) if hand
           else jnp.einsum("...td,sdhk->...shtk", x, w))
    q, k, v = unstack(qkv, axis=-4)
    q, k = (rope_heads_first(a, positions, cfg.rope_base) for a in (q, k))
  else:
    w = jnp.concatenate([wq, p["wk"], p["wv"]], axis=1).astype(cdt)
    qkv = (jnp.moveaxis(jnp.einsum("...td,dhk->...thk", x, w), -3, -2) if hand
           else jnp.einsum("...td,dhk->...htk", x, w))
    qk = rope_heads_first(qkv[..., :H + K, :, :], positions, cfg.rope_base)
    q, k, v = qk[..., :H, :, :], qk[..., H:, :, :], qkv[..., H + K:, :, :]
  if H > K:
    k, v = jnp.repeat(k, H // K, axis=-3), jnp.repeat(v, H // K, axis=-3)
  t = x.shape[-2]
  block = cfg.attention_block if 0 < cfg.attention_block < t and t % cfg.attention_block == 0 else t
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  outs = []
  for start in range(0, t, block):
    stop = start + block
    logits = jnp.einsum("...hqk,...hsk->...hqs", q[..., start:stop, :], k[..., :stop, :])
    logits = jnp.where(causal[start:stop, :stop], logits.astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)
    # softmax(l) @ v = (exp(l - max) @ v) / sum(exp(l - max)); the max is a constant shift.
    e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    out = jnp.einsum("...hqs,...hsk->...hqk", e.astype(cdt), v[..., :stop, :])
    outs.append((out / e.sum(axis=-1, keepdims=True)).astype(cdt))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-2)
  if not hand:
    return jnp.einsum("...htk,hkd->...td", out, p["wo"].astype(cdt))
  return dense(jnp.moveaxis(out, -3, -2), p["wo"].astype(cdt), 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def unstack(x: jax.Array, axis: int) -> tuple[jax.Array, ...]:
  """``x`` split into its slices along ``axis``; the backward pass stacks the slices'
  cotangents in one concatenation (XLA would otherwise pad each with zeros and add)."""
  axis %= x.ndim
  return tuple(jax.lax.index_in_dim(x, i, axis, keepdims=False) for i in range(x.shape[axis]))


def _unstack_fwd(x, axis):
  return unstack(x, axis), None


def _unstack_bwd(axis, _, cts):
  return (jnp.stack(cts, axis=axis),)


unstack.defvjp(_unstack_fwd, _unstack_bwd)


def _swiglu(x, p, fused: bool = False, hand_backward: bool = True):
  """SwiGLU MLP; ``fused``: gate and up projections as one matmul."""
  cdt = x.dtype
  if fused and hand_backward:
    gate_up = dense(x, jnp.stack([p["w_gate"], p["w_up"]], axis=1).astype(cdt))
    return dense(silu_glu(gate_up), p["w_down"].astype(cdt))
  if fused:
    gate_up = jnp.einsum("...d,sdf->...sf", x, jnp.stack([p["w_gate"], p["w_up"]]).astype(cdt))
    gate, up = unstack(gate_up, axis=-2)
  else:
    gate = jnp.einsum("...d,df->...f", x, p["w_gate"].astype(cdt))
    up = jnp.einsum("...d,df->...f", x, p["w_up"].astype(cdt))
  return jnp.einsum("...f,fd->...d", jax.nn.silu(gate) * up, p["w_down"].astype(cdt))


@jax.custom_vjp
def silu_glu(gate_up: jax.Array) -> jax.Array:
  """``silu(gate) * up`` for ``gate_up [..., 2, F]``; its backward pass is written out (one
  sigmoid, no division) and returns the stacked gradient in one piece: 4% a step on CPU."""
  return jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]


def _silu_glu_fwd(gate_up):
  return silu_glu(gate_up), gate_up


def _silu_glu_bwd(gate_up, dh):
  gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
  sig = jax.nn.sigmoid(gate)
  silu = gate * sig
  return (jnp.stack([dh * up * (sig + silu * (1 - sig)), dh * silu], axis=-2),)


silu_glu.defvjp(_silu_glu_fwd, _silu_glu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
  """``x [..., *c] @ w [*c, *out] -> [..., *out]`` over the ``contract`` trailing dims of x.
  The same function as the einsum; its backward pass takes the weight gradient as
  ``x^T @ dy`` over the flattened tokens, so XLA:CPU transposes the narrow input rather than
  the wide output gradient (autodiff's order: 6% a step on the default model, same numerics)."""
  return jnp.tensordot(x, w, axes=contract)


def _dense_fwd(x, w, contract):
  return dense(x, w, contract), (x, w)


def _dense_bwd(contract, res, dy):
  x, w = res
  out = w.ndim - contract
  outs = tuple(range(contract, w.ndim))
  dx = jnp.tensordot(dy, w, axes=(tuple(range(dy.ndim - out, dy.ndim)), outs))
  lead = tuple(range(x.ndim - contract))
  if math.prod(x.shape[-contract:]) <= math.prod(w.shape[contract:]):  # transpose the narrower
    return dx, jnp.tensordot(x, dy, axes=(lead, lead))
  dw_t = jnp.tensordot(dy, x, axes=(lead, lead))  # [*out, *c]
  return dx, jnp.moveaxis(dw_t, tuple(range(out)), outs)


dense.defvjp(_dense_fwd, _dense_bwd)


# ---------------------------------------------------------------------------- functional API

def build(cfg: ModelConfig) -> tuple[nnx.GraphDef, Any]:
  """Graph definition plus abstract params (ShapeDtypeStructs) of the model, without FLOPs."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  return graphdef, nnx.to_pure_dict(state)


def logical_axes(cfg: ModelConfig) -> Any:
  """Pytree (same structure as params) of logical axis-name tuples."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(abstract)
  axes = jax.tree.map(lambda v: v.get_metadata()["axes"], state,
                      is_leaf=lambda v: isinstance(v, nnx.Variable))
  return nnx.to_pure_dict(axes)


def init_params(cfg: ModelConfig, key: jax.Array) -> Any:
  """Fresh parameters as a pure dict (jit this with out_shardings to create them sharded)."""
  return nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(params=key))))


def apply(graphdef: nnx.GraphDef, params: Any, tokens: jax.Array, rows: Any = None
          ) -> jax.Array:
  return nnx.merge(graphdef, params)(tokens, rows)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """Model FLOPs of one training token (forward + backward), PaLM's convention (Chowdhery et
  al. 2022, App. B): ``6 N + 12 L T H Dh``, where N counts the matmul weights (every parameter
  but the input embedding lookup and the norm scales; the unembedding counts, tied or not) and
  the second term is the attention scores and values over the full T x T square (no causal
  discount, so the fused path's skipped blocks do not count as work done)."""
  L, D, H, K, Dh, F = (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads,
                       cfg.head_dim, cfg.mlp_dim)
  per_layer = D * H * Dh + 2 * D * K * Dh + H * Dh * D + 3 * D * F
  n = L * per_layer + D * cfg.vocab_size
  return 6 * n + 12 * L * seq_len * H * Dh


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
