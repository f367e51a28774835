"""The public API (docs/API.md): a user-written model and a user-written optax outer transform
train through ``engine.build_for_loss`` / ``init`` / ``inner_step`` / ``sync`` /
``eval_params``, checked against a numpy reference; the doc's example is executed."""

import ast
import os
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from conftest import ROOT
from fedjax_lm import config_lib
from fedjax_lm import engine
from fedjax_lm import mesh as mesh_lib


class _Velocity(NamedTuple):
  v: dict


def _heavy_ball(lr, momentum):
  """A user's outer optimizer: v <- momentum v + delta; x <- x - lr v."""
  def init(params):
    return _Velocity(jax.tree.map(jnp.zeros_like, params))

  def update(delta, state, params=None):
    del params
    v = jax.tree.map(lambda v, d: momentum * v + d, state.v, delta)
    return jax.tree.map(lambda x: -lr * x, v), _Velocity(v)
  return optax.GradientTransformation(init, update)


def _linear(num, algorithm, every, one_device):
  config = config_lib.base_config()
  config.algorithm, config.islands.num, config.total_steps = algorithm, num, 6
  config.outer.sync_every = every
  mesh = mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 1, "tensor": 1}, one_device)
  init_fn = lambda key: {"w": jnp.zeros((3,)), "b": jnp.zeros(())}
  loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2)
  return engine.build_for_loss(
      config, mesh, loss_fn=loss_fn, init_fn=init_fn,
      abstract_params=jax.eval_shape(init_fn, jax.random.key(0)),
      param_specs={"w": P(None), "b": P()}, inner_tx=optax.sgd(0.1),
      outer_tx=_heavy_ball(0.8, 0.5))


def _batches(num, steps):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(steps):
    x = rng.normal(size=(num, 4, 3)).astype(np.float32)
    out.append({"x": x, "y": (x @ np.array([1.0, -2.0, 0.5]) + 0.3).astype(np.float32)})
  return out


def _grad(w, b, x, y):
  r = x @ w + b - y
  return 2 * x.T @ r / len(y), 2 * r.mean()


def test_user_model_and_outer_transform_match_numpy(one_device):
  """M=3 islands, H=2, inner SGD 0.1, the user's heavy-ball outer (0.8, 0.5), written out in
  numpy: global params after every sync, islands reset to them, island losses each step."""
  eng = _linear(3, "islands", 2, one_device)
  batches = _batches(3, 6)
  state = eng.init(jax.random.key(0))
  g_w, g_b, v_w, v_b = np.zeros(3), 0.0, np.zeros(3), 0.0
  local = [(g_w.copy(), g_b) for _ in range(3)]
  for step, batch in enumerate(batches):
    state, metrics = eng.inner_step(state, jax.tree.map(jnp.asarray, batch))
    losses = []
    for m in range(3):
      w, b = local[m]
      x, y = batch["x"][m].astype(np.float64), batch["y"][m].astype(np.float64)
      losses.append(np.mean((x @ w + b - y) ** 2))
      dw, db = _grad(w, b, x, y)
      local[m] = (w - 0.1 * dw, b - 0.1 * db)
    np.testing.assert_allclose(metrics["island_loss"], losses, rtol=1e-5)
    state = eng.sync(state, step + 1)
    if (step + 1) % 2 == 0:
      d_w = g_w - np.mean([w for w, _ in local], axis=0)
      d_b = g_b - np.mean([b for _, b in local])
      v_w, v_b = 0.5 * v_w + d_w, 0.5 * v_b + d_b
      g_w, g_b = g_w - 0.8 * v_w, g_b - 0.8 * v_b
      local = [(g_w.copy(), g_b) for _ in range(3)]
      params = eng.eval_params(state)
      np.testing.assert_allclose(params["w"], g_w, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(params["b"], g_b, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(state.islands.params["w"], np.stack([g_w] * 3), rtol=1e-5,
                                 atol=1e-6)
  assert eng.island_bytes(6) == 3 * 4 * 4  # 3 syncs of 4 float32 values
  assert eng.num_islands == 3 and isinstance(state.islands.codec, optax.EmptyState)


def test_user_model_ddp_is_sgd_on_the_mean_gradient(one_device):
  """The same user model as DDP over 2 islands: plain SGD on the mean of the islands' mean
  gradients; ``sync`` is a no-op and the gradient's bytes are counted every step."""
  eng = _linear(2, "ddp", 1, one_device)
  state = eng.init(jax.random.key(0))
  w, b = np.zeros(3), 0.0
  for step, batch in enumerate(_batches(2, 6)):
    state, _ = eng.inner_step(state, jax.tree.map(jnp.asarray, batch))
    state = eng.sync(state, step + 1)
    grads = [_grad(w, b, batch["x"][m].astype(np.float64), batch["y"][m].astype(np.float64))
             for m in range(2)]
    w = w - 0.1 * np.mean([g for g, _ in grads], axis=0)
    b = b - 0.1 * np.mean([g for _, g in grads])
  np.testing.assert_allclose(eng.eval_params(state)["w"], w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(eng.eval_params(state)["b"], b, rtol=1e-5, atol=1e-6)
  assert eng.island_bytes(6) == 6 * 4 * 4


def _doc_blocks(path):
  text = open(os.path.join(ROOT, path)).read()
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_api_doc_example_runs_and_learns(capsys):
  """The example in docs/API.md (the block after "Example") runs as written and does what
  the doc says it prints."""
  example = next(b for b in _doc_blocks("docs/API.md") if "heavy_ball" in b)
  scope = {}
  exec(compile(example, "docs/API.md", "exec"), scope)  # pylint: disable=exec-used
  params = scope["params"]
  np.testing.assert_allclose(params["w"], [1.0, -2.0, 0.5], atol=0.02)
  np.testing.assert_allclose(params["b"], 0.3, atol=0.02)
  assert scope["eng"].island_bytes(60) == 96
  assert capsys.readouterr().out.strip()


def test_engine_imports_have_no_cycle():
  """The library's import graph (from the source, every module) has no cycle; a submodule
  reading its own package's namespace is not an edge back."""
  lib = os.path.join(ROOT, "fedjax_lm")
  graph = {}
  for dirpath, _, files in os.walk(lib):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
          if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
              "fedjax_lm"):
            deps |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
          elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.startswith("fedjax_lm")}
        graph[mod] = deps
  graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}

  def visit(m, stack):
    if m in stack:
      raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
    for d in graph[m]:
      if not (m.startswith(d + ".") and d.count(".") < m.count(".")):  # a package's own init
        visit(d, stack + [m])

  for m in graph:
    visit(m, [])
