"""Transformer: shapes, dtypes, parameter count, causality, GQA, RoPE, logical axes, shardings."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_lm import config_lib
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import model as model_lib

# V=64, L=2, D=16, H=4, K=2 (GQA, 2 query heads per kv head), Dh=8, F=32: every dim that the
# default rules shard (vocab, embed, heads, kv_heads, mlp) is divisible by 2.
SMALL = dict(vocab_size=64, num_layers=2, embed_dim=16, num_heads=4, num_kv_heads=2, head_dim=8,
             mlp_dim=32, max_len=32)


def _cfg(**overrides):
  return model_lib.ModelConfig(**{**SMALL, **overrides})


def _init(cfg, seed=0):
  graphdef, _ = model_lib.build(cfg)
  params = model_lib.init_params(cfg, jax.random.key(seed))
  return graphdef, params


def _tokens(batch, seq, vocab, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, seq)), jnp.int32)


# ----------------------------------------------------------------------------- forward pass

def test_apply_shape_and_dtype():
  cfg = _cfg()
  graphdef, params = _init(cfg)
  logits = model_lib.apply(graphdef, params, _tokens(3, 10, cfg.vocab_size))
  assert logits.shape == (3, 10, cfg.vocab_size)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  # Params are float32 (param_dtype default).
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_bf16_compute_returns_f32_logits_close_to_f32():
  cfg32 = _cfg()
  cfg16 = _cfg(compute_dtype="bfloat16")
  graphdef32, params = _init(cfg32)
  graphdef16, params16 = _init(cfg16)
  # Same key, same param dtype: bf16 compute does not change the parameters themselves.
  jax.tree.map(np.testing.assert_array_equal, params, params16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params16))
  tokens = _tokens(2, 12, cfg32.vocab_size)
  l32 = np.asarray(model_lib.apply(graphdef32, params, tokens))
  l16 = model_lib.apply(graphdef16, params, tokens)
  assert l16.dtype == jnp.float32
  assert l16.shape == l32.shape
  l16 = np.asarray(l16)
  assert not np.array_equal(l16, l32)  # it really computed in bf16
  np.testing.assert_allclose(l16, l32, atol=0.1, rtol=0.05)  # observed max |diff| ~0.02
  assert np.abs(l16 - l32).mean() < 0.02


def test_tied_embeddings_apply_and_no_unembed():
  cfg = _cfg(tie_embeddings=True)
  graphdef, params = _init(cfg)
  assert "unembed" not in params
  logits = model_lib.apply(graphdef, params, _tokens(2, 5, cfg.vocab_size))
  assert logits.shape == (2, 5, cfg.vocab_size) and logits.dtype == jnp.float32


def test_exact_parameter_count():
  # V=64, L=2, D=16, H=4, K=2, Dh=8, F=32, untied:
  #   embed                 V*D           = 64*16        = 1024
  #   per layer:
  #     attn_norm, mlp_norm 2*D           = 2*16         =   32
  #     wq                  D*H*Dh        = 16*4*8       =  512
  #     wk, wv              2*D*K*Dh      = 2*16*2*8     =  512
  #     wo                  H*Dh*D        = 4*8*16       =  512
  #     w_gate, w_up        2*D*F         = 2*16*32      = 1024
  #     w_down              F*D           = 32*16        =  512
  #                                                  sum = 3104, x L=2 -> 6208
  #   final_norm            D             =                  16
  #   unembed               D*V           = 16*64        = 1024
  #   total = 1024 + 6208 + 16 + 1024 = 8272; tied: 8272 - 1024 = 7248.
  cfg = _cfg()
  _, params = _init(cfg)
  assert model_lib.count_params(params) == 8272
  _, tied = _init(_cfg(tie_embeddings=True))
  assert model_lib.count_params(tied) == 7248
  # The abstract params from `build` agree (no FLOPs spent).
  _, abstract = model_lib.build(cfg)
  assert model_lib.count_params(abstract) == 8272
  expected_shapes = {
      "embed": (64, 16), "attn_norm": (2, 16), "wq": (2, 16, 4, 8), "wk": (2, 16, 2, 8),
      "wv": (2, 16, 2, 8), "wo": (2, 4, 8, 16), "mlp_norm": (2, 16), "w_gate": (2, 16, 32),
      "w_up": (2, 16, 32), "w_down": (2, 32, 16), "final_norm": (16,), "unembed": (16, 64)}
  assert {k: tuple(v.shape) for k, v in params.items()} == expected_shapes


@pytest.mark.parametrize("t", [0, 3, 8])
def test_causality(t):
  """Changing tokens after position t leaves logits at positions <= t unchanged."""
  cfg = _cfg()
  graphdef, params = _init(cfg)
  seq = 10
  tokens = _tokens(2, seq, cfg.vocab_size, seed=1)
  changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % cfg.vocab_size)
  a = np.asarray(model_lib.apply(graphdef, params, tokens))
  b = np.asarray(model_lib.apply(graphdef, params, changed))
  np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], rtol=1e-5, atol=1e-6)
  # ...and the later positions do depend on the changed tokens (the test can fail).
  assert np.abs(a[:, t + 1:] - b[:, t + 1:]).max() > 1e-3


def test_gqa_runs_and_matches_repeated_kv_heads():
  """GQA with K kv heads equals full MHA whose kv weights repeat each kv head H/K times."""
  gqa = _cfg()  # H=4, K=2
  mha = _cfg(num_kv_heads=4)
  graphdef, params = _init(gqa)
  logits = model_lib.apply(graphdef, params, _tokens(2, 6, gqa.vocab_size))
  assert logits.shape == (2, 6, gqa.vocab_size)
  assert params["wk"].shape == (2, 16, 2, 8)
  mha_params = dict(params)
  for name in ("wk", "wv"):  # jnp.repeat on heads: [k0, k0, k1, k1]
    mha_params[name] = jnp.repeat(params[name], 2, axis=2)
  mha_graphdef, _ = model_lib.build(mha)
  tokens = _tokens(2, 6, gqa.vocab_size, seed=3)
  np.testing.assert_allclose(model_lib.apply(graphdef, params, tokens),
                             model_lib.apply(mha_graphdef, mha_params, tokens),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads,block,seq", [(4, 8, 32), (2, 8, 32), (4, 0, 12), (4, 5, 12)])
def test_formulations_agree_in_f32(kv_heads, block, seq):
  """fused (stacked QKV, head-major, causal query blocks, rotation as a matmul), with its
  written-out backward passes or autodiff's, unrolled or scanned layers, and
  jax.nn.dot_product_attention compute the reference function: same logits and gradients
  within f32 rounding (blocks that do not divide T fall back to one)."""
  ref = _cfg(num_kv_heads=kv_heads, attention="einsum", scan_layers=True)
  graphdef, params = _init(ref)
  tokens = _tokens(2, seq, ref.vocab_size)

  def loss_and_grad(cfg):
    g, _ = model_lib.build(cfg)
    loss = lambda p: jnp.mean(model_lib.apply(g, p, tokens) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  want_loss, want_grad = loss_and_grad(ref)
  for variant in (dict(attention="fused", attention_block=block, scan_layers=False),
                  dict(attention="fused", attention_block=block, scan_layers=True),
                  dict(attention="fused", attention_block=block, hand_backward=False),
                  dict(attention="einsum", scan_layers=False),
                  dict(attention="dot_product", scan_layers=False)):
    loss, grad = loss_and_grad(_cfg(num_kv_heads=kv_heads, **variant))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=str(variant))
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=1e-6,
                                   err_msg=str(variant)), grad, want_grad)


def test_rope_heads_first_equals_rope():
  x = jax.random.normal(jax.random.key(1), (2, 9, 3, 8))  # [B, T, heads, Dh]
  positions = jnp.arange(9)
  want = model_lib.rope(x, positions, 100.0)
  got = model_lib.rope_heads_first(jnp.swapaxes(x, 1, 2), positions, 100.0)
  np.testing.assert_allclose(jnp.swapaxes(got, 1, 2), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_rope_tables_are_constants_of_the_compiled_step(kv_heads):
  """cos / sin of the [T, Dh] angles are computed once, at trace time, not per element of
  every head's q and k inside the step (the same logits as with traced positions)."""
  cfg = _cfg(num_kv_heads=kv_heads)
  graphdef, params = _init(cfg)
  tokens = _tokens(2, 16, cfg.vocab_size)
  loss = lambda p: model_lib.apply(graphdef, p, tokens).mean()
  hlo = jax.jit(jax.value_and_grad(loss)).lower(params).compile().as_text()
  assert "cosine(" not in hlo and "sine(" not in hlo
  x = jax.random.normal(jax.random.key(2), (2, 3, 16, 8))
  traced = jax.jit(lambda x, pos: model_lib.rope_heads_first(x, pos, 1e4))(x, jnp.arange(16))
  const = jax.jit(lambda x: model_lib.rope_heads_first(x, np.arange(16), 1e4))(x)
  np.testing.assert_array_equal(const, traced)  # XLA's own cos / sin either way


def test_unknown_attention_is_rejected():
  c = config_lib.base_config().model
  c["attention"] = "flash"
  with pytest.raises(ValueError, match="model.attention='flash'"):
    model_lib.ModelConfig.from_config(c)


def test_train_flops_per_token_by_hand():
  # SMALL: L=2, D=16, H=4, K=2, Dh=8, F=32, V=64; per layer q 512 + k,v 2*256 + o 512 +
  # mlp 3*512 = 3072; N = 2*3072 + 16*64 = 7168; 6N = 43008; attention 12*2*T*4*8 at T=10: 7680
  assert model_lib.train_flops_per_token(_cfg(), 10) == 43008 + 7680


def test_from_config_accepts_base_model_config():
  cfg = model_lib.ModelConfig.from_config(config_lib.base_config().model)
  assert cfg == model_lib.ModelConfig()


def test_from_config_rejects_heads_not_divisible_by_kv_heads():
  c = config_lib.base_config().model
  c.num_heads, c.num_kv_heads = 6, 4
  with pytest.raises(ValueError, match=r"num_heads=6.*num_kv_heads=4"):
    model_lib.ModelConfig.from_config(c)


def test_from_config_rejects_unknown_keys():
  c = dict(config_lib.base_config().model)
  c["num_experts"] = 8
  with pytest.raises(ValueError, match="num_experts"):
    model_lib.ModelConfig.from_config(c)


def test_from_config_rejects_unknown_dtype():
  c = dict(config_lib.base_config().model)
  c["compute_dtype"] = "float16"
  with pytest.raises(ValueError, match="compute_dtype"):
    model_lib.ModelConfig.from_config(c)


# ------------------------------------------------------------------------------------- rope

def test_rope_position_zero_is_identity():
  x = jax.random.normal(jax.random.key(0), (1, 3, 8))  # [T=1, heads, Dh]
  np.testing.assert_allclose(model_lib.rope(x, jnp.array([0]), 10_000.0), x, rtol=0, atol=0)


def test_rope_by_hand_dh2():
  """Dh=2: one frequency (base**0 = 1), so position m rotates (x1, x2) by angle m."""
  x = jnp.array([[[1.0, 2.0]], [[1.0, 2.0]], [[-0.5, 3.0]]])  # [T=3, 1, 2]
  pos = jnp.array([0, 1, 2])
  out = np.asarray(model_lib.rope(x, pos, 10_000.0))
  for i, m in enumerate([0, 1, 2]):
    x1, x2 = np.asarray(x[i, 0])
    expected = [x1 * np.cos(m) - x2 * np.sin(m), x2 * np.cos(m) + x1 * np.sin(m)]
    np.testing.assert_allclose(out[i, 0], expected, rtol=1e-6, atol=1e-6)


def test_rope_preserves_norm_and_shape():
  x = jax.random.normal(jax.random.key(1), (5, 2, 16))
  out = model_lib.rope(x, jnp.arange(5) * 3, 10_000.0)
  assert out.shape == x.shape and out.dtype == x.dtype
  np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x, axis=-1),
                             rtol=1e-5)


def test_rope_relative_position_property():
  """<rope(q, m), rope(k, n)> depends only on m - n."""
  kq, kk = jax.random.split(jax.random.key(2))
  q = jax.random.normal(kq, (16,))
  k = jax.random.normal(kk, (16,))
  base = 100.0

  def score(m, n):
    rq = model_lib.rope(q[None, None, :], jnp.array([m]), base)[0, 0]
    rk = model_lib.rope(k[None, None, :], jnp.array([n]), base)[0, 0]
    return float(jnp.dot(rq, rk))

  for diff in (0, 1, 5):
    scores = [score(n + diff, n) for n in (0, 3, 11, 40)]
    np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
  assert score(0, 0) == pytest.approx(float(jnp.dot(q, k)), rel=1e-5, abs=1e-5)
  # Different offsets give different scores: the property is not vacuous.
  assert abs(score(5, 0) - score(1, 0)) > 1e-3


# ----------------------------------------------------------------------- logical axes / sharding

def test_logical_axes_match_param_tree():
  cfg = _cfg()
  _, params = _init(cfg)
  axes = model_lib.logical_axes(cfg)
  is_tuple = lambda x: isinstance(x, tuple)
  assert jax.tree.structure(axes, is_leaf=is_tuple) == jax.tree.structure(params)
  flat_axes = jax.tree.leaves(axes, is_leaf=is_tuple)
  for names, leaf in zip(flat_axes, jax.tree.leaves(params)):
    assert isinstance(names, tuple)
    assert len(names) == leaf.ndim, (names, leaf.shape)
  assert axes["wq"] == ("layers", "embed", "heads", "head_dim")
  assert axes["wk"] == ("layers", "embed", "kv_heads", "head_dim")
  assert axes["embed"] == ("vocab", "embed")
  assert axes["final_norm"] == ("embed",)


EXPECTED_SPECS = {
    "embed": P("tensor", "fsdp"),
    "attn_norm": P(None, "fsdp"),
    "wq": P(None, "fsdp", "tensor", None),
    "wk": P(None, "fsdp", "tensor", None),
    "wv": P(None, "fsdp", "tensor", None),
    "wo": P(None, "tensor", None, "fsdp"),
    "mlp_norm": P(None, "fsdp"),
    "w_gate": P(None, "fsdp", "tensor"),
    "w_up": P(None, "fsdp", "tensor"),
    "w_down": P(None, "tensor", "fsdp"),
    "final_norm": P("fsdp"),
    "unembed": P("fsdp", "tensor"),
}


def _fsdp_tensor_mesh():
  return mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])


def test_param_specs_follow_default_rules():
  cfg = _cfg()
  rules = dict(config_lib.base_config().rules)
  specs = mesh_lib.param_specs(model_lib.logical_axes(cfg), rules)
  assert specs == EXPECTED_SPECS


def test_sharded_init_compiles_with_expected_shardings():
  """Compile only (never execute multi-device in-process)."""
  cfg = _cfg()
  mesh = _fsdp_tensor_mesh()
  rules = dict(config_lib.base_config().rules)
  specs = mesh_lib.param_specs(model_lib.logical_axes(cfg), rules)
  _, abstract = model_lib.build(cfg)
  mesh_lib.check_divisible(abstract, specs, dict(mesh.shape))
  shardings = mesh_lib.shardings(mesh, specs)
  init = jax.jit(functools.partial(model_lib.init_params, cfg), out_shardings=shardings)
  compiled = init.lower(jax.random.key(0)).compile()
  out = compiled.output_shardings
  assert set(out) == set(EXPECTED_SPECS)
  for name, spec in EXPECTED_SPECS.items():
    expected = NamedSharding(mesh, spec)
    got = out[name]
    assert isinstance(got, NamedSharding), (name, got)
    assert got == expected, (name, got, expected)
    assert got.shard_shape(abstract[name].shape) == expected.shard_shape(abstract[name].shape)
  # Shard shapes halve exactly the dims mapped to fsdp (2) and tensor (2).
  # L=2, D=16, H=4, K=2, Dh=8, F=32, V=64.
  want = {
      "embed": (32, 8), "attn_norm": (2, 8), "wq": (2, 8, 2, 8), "wk": (2, 8, 1, 8),
      "wv": (2, 8, 1, 8), "wo": (2, 2, 8, 8), "mlp_norm": (2, 8), "w_gate": (2, 8, 16),
      "w_up": (2, 8, 16), "w_down": (2, 16, 8), "final_norm": (8,), "unembed": (8, 32)}
  got_shapes = {k: tuple(out[k].shard_shape(abstract[k].shape)) for k in want}
  assert got_shapes == want
  # And one device holds a quarter of every 2-way x 2-way sharded matrix.
  assert np.prod(want["wq"]) * 4 == np.prod(abstract["wq"].shape)


def test_odd_head_dim_is_rejected_early():
  cfg = dict(config_lib.base_config().model)
  cfg["head_dim"] = 7
  with pytest.raises(ValueError, match="model.head_dim=7"):
    model_lib.ModelConfig.from_config(cfg)


def test_unstack_matches_slicing_forward_and_backward():
  """model.unstack's custom backward (one stack of the cotangents) equals slicing's."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
  w = jax.random.normal(jax.random.key(1), (3, 2, 4, 5))

  def loss(fn, x):
    return sum(jnp.sum(jnp.sin(s) * w[i]) for i, s in enumerate(fn(x)))

  sliced = lambda x: tuple(x[:, i] for i in range(3))
  ours = lambda x: model_lib.unstack(x, axis=-3)
  for a, b in zip(ours(x), sliced(x)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(jax.grad(lambda x: loss(ours, x))(x),
                                jax.grad(lambda x: loss(sliced, x))(x))


@pytest.mark.parametrize("x_shape,w_shape,contract", [
    ((2, 5, 3), (3, 2, 4), 1),   # x narrower than the output: x^T @ dy
    ((2, 5, 6), (6, 4), 1),      # x wider: (dy^T @ x)^T
    ((2, 5, 2, 3), (2, 3, 4), 2)])
def test_dense_equals_tensordot_forward_and_backward(x_shape, w_shape, contract):
  """model.dense's written-out backward (either operand order) equals autodiff's."""
  x = jax.random.normal(jax.random.key(0), x_shape)
  w = jax.random.normal(jax.random.key(1), w_shape)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, contract)))
  np.testing.assert_allclose(model_lib.dense(x, w, contract), jnp.tensordot(x, w, contract),
                             rtol=1e-6)
  for got, want in zip(jax.grad(loss(model_lib.dense), (0, 1))(x, w),
                       jax.grad(loss(jnp.tensordot), (0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_silu_glu_backward_by_hand_and_against_autodiff():
  """silu_glu's written-out backward: silu'(0) = 1/2 and d/dup = silu(gate) by hand, and
  autodiff's gradient of silu(gate) * up elsewhere."""
  gate_up = jnp.array([[0.0, -1.5, 2.0], [3.0, 0.5, -2.0]])[None]  # [1, 2 (gate, up), 3]
  dh = jnp.array([[1.0, 2.0, -1.0]])
  _, vjp = jax.vjp(model_lib.silu_glu, gate_up)
  (got,) = vjp(dh)
  np.testing.assert_allclose(got[0, 0, 0], 1.0 * 3.0 * 0.5)  # dh * up * silu'(0)
  np.testing.assert_allclose(got[0, 1, 0], 0.0)  # dh * silu(0)
  ref = lambda gu: jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :]
  (want,) = jax.vjp(ref, gate_up)[1](dh)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(model_lib.silu_glu(gate_up), ref(gate_up), rtol=1e-7)
