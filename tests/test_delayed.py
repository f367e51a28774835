"""The one-step-delayed outer step of Kale et al. 2025 (arXiv 2502.12996), ``outer.delay``:
its naive delayed and eager variants against a numpy reference written from the paper, an
identity with DiLoCo, the clock's event order on both links, and exact resume."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import run_cli
from conftest import tiny_config
from fedjax_lm import engine
from fedjax_lm import metrics as metrics_lib
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import model as model_lib
from fedjax_lm.engine import clock as clock_lib


def _mesh(devices):
  return mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 1, "tensor": 1}, devices)


def _nesterov(x, t, d, lr, mu):
  """optax's Nesterov SGD on a descent direction ``d``: t <- d + mu t; x <- x - lr (d + mu t)."""
  t = d + mu * t
  return x - lr * (d + mu * t), t


def _paper(y, *, variant, num_frags, every, total, stop, lr_in=0.5, lr=0.7, mu=0.9):
  """DiLoCo with the outer gradient applied one outer step late, on loss 0.5 |w - y_m|^2 per
  worker (inner SGD), from the paper's description (Sec. 2; its Algorithms 2 and 3):

  * every worker's inner phase r starts from its outer params; at the phase's end it computes
    its outer gradient d_m,r = start - local and launches the all-reduce, which completes
    during phase r + 1;
  * naive (Algorithm 2): the outer optimizer applies the mean of round r - 1, dbar_r-1, at the
    end of phase r, and every worker starts phase r + 1 from that one shared point;
  * eager (Algorithm 3): worker m applies, with its own outer optimizer state, the eager outer
    gradient, its fresh d_m,r with the others' delayed d_m',r-1: (d_m,r + sum_{m' != m}
    d_m',r-1) / M, and starts phase r + 1 from its own outer params.

  Fragments (rows p::P) send when step % H == p H // P and all at step ``total``, where the
  last mean lands and the global copy applies it. The run of ``total`` steps is observed after
  step ``stop``. Returns (global params, workers' params); the global copy applies every mean
  in order, one round late (for eager, what the workers' own copies approximate), and the
  global params with every mean received so far applied (what evaluation reads)."""
  m, r = y.shape
  g, t = np.zeros(r), np.zeros(r)  # the global copy: the true means, one round late
  x, tx = np.zeros((m, r)), np.zeros((m, r))  # eager: each worker's outer copy and momentum
  own_prev, held = np.zeros((m, r)), np.zeros(r)
  local = np.zeros((m, r))
  unapplied = set()  # fragments whose held mean the global copy has not applied yet
  for step in range(1, stop + 1):
    local = local - lr_in * (local - y)
    sends = [p for p in range(num_frags) if step % every == p * every // num_frags]
    if step == total:
      sends = list(range(num_frags))
    for p in sends:
      rows = slice(p, None, num_frags)
      n = len(g[rows])
      start = x[:, rows] if variant == "eager" else np.broadcast_to(g[rows], (m, n))
      d = start - local[:, rows]
      if variant == "eager":
        others_prev = own_prev[:, rows].sum(0)[None] - own_prev[:, rows]
        x[:, rows], tx[:, rows] = _nesterov(x[:, rows], tx[:, rows], (d + others_prev) / m,
                                            lr, mu)
        own_prev[:, rows] = d
      g[rows], t[rows] = _nesterov(g[rows], t[rows], held[rows], lr, mu)  # round r - 1's mean
      local[:, rows] = x[:, rows] if variant == "eager" else g[rows]
      held[rows] = d.mean(0)  # lands during the next inner phase
      unapplied.add(p)
      if step == total:
        g[rows], t[rows] = _nesterov(g[rows], t[rows], held[rows], lr, mu)
        local[:, rows] = x[:, rows] if variant == "eager" else g[rows]
        unapplied.discard(p)
  current = g.copy()
  for p in unapplied:
    rows = slice(p, None, num_frags)
    current[rows] = _nesterov(g[rows], t[rows], held[rows], lr, mu)[0]
  return g, local, current


def _quadratic(one_device, m, r, total, **over):
  config = tiny_config(**{
      "algorithm": "islands", "islands.num": m, "outer.sync_every": 4,
      "outer.optimizer": "diloco", "outer.learning_rate": 0.7, "outer.momentum": 0.9,
      "total_steps": total, **over})
  return engine.build_for_loss(
      config, _mesh(one_device), loss_fn=lambda p, b: 0.5 * jnp.sum((p["w"] - b["y"][0]) ** 2),
      init_fn=lambda key: {"w": jnp.zeros(r)},
      abstract_params={"w": jax.ShapeDtypeStruct((r,), jnp.float32)},
      param_specs={"w": P(None)}, inner_tx=optax.sgd(0.5))


@pytest.mark.parametrize("variant", ["naive", "eager"])
@pytest.mark.parametrize("num_frags", [1, 2])
@pytest.mark.parametrize("transport", ["xla", "host"])
def test_delayed_matches_paper_reference(one_device, variant, num_frags, transport):
  """3 workers, 7 rows (uneven fragments), 11 steps (not a multiple of H = 4), Nesterov
  0.7 / 0.9: global and workers' params after every step's sync, on both links (the host
  link holds each exchange in flight across the next inner phase)."""
  total, m, r = 11, 3, 7
  y = np.random.default_rng(1).standard_normal((m, r)).astype(np.float32)
  alg = _quadratic(one_device, m, r, total, **{"outer.delay": variant,
                                               "outer.fragments": num_frags,
                                               "outer.transport": transport})
  state = alg.init(jax.random.key(0))
  batch = {"y": jnp.asarray(y)[:, None, :]}
  for step in range(1, total + 1):
    state, _ = alg.inner_step(state, batch)
    state = alg.sync(state, step)
    g, local, current = _paper(y, variant=variant, num_frags=num_frags, every=4, total=total,
                               stop=step)
    np.testing.assert_allclose(state.islands.params["w"], local, rtol=1e-5, atol=1e-6)
    if step == 6:  # an eval or checkpoint mid-phase lands the exchange in flight early
      state = alg.settle(state)
    np.testing.assert_allclose(state.server.params["w"], g, rtol=1e-5, atol=1e-6)
    if transport == "xla" or step in (6, total):  # (the host link's mean may be in flight)
      np.testing.assert_allclose(alg.eval_params(state)["w"], current, rtol=1e-5, atol=1e-6)


def test_eager_with_one_island_is_diloco(one_device):
  """M = 1: the eager outer gradient is the island's own fresh one, so its inner phases are
  DiLoCo's exactly; and its global copy, one round late, ends at DiLoCo's global params (same
  means, same order, same Nesterov state). On the transformer with AdamW inside."""
  runs = {}
  for delay in ("none", "eager"):
    config = tiny_config(**{"algorithm": "islands", "islands.num": 1, "outer.sync_every": 3,
                            "total_steps": 8, "outer.delay": delay})
    alg = engine.build(config, _mesh(one_device),
                       model_lib.ModelConfig.from_config(config.model))
    state = alg.init(jax.random.key(0))
    losses = []
    for step, batch in enumerate(_batches(1, 8)):
      state, metrics = alg.inner_step(state, batch)
      losses.append(np.asarray(metrics["island_loss"]))
      state = alg.sync(state, step + 1)
    runs[delay] = (np.stack(losses), state)
  np.testing.assert_allclose(runs["eager"][0], runs["none"][0], rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
               runs["eager"][1].server.params, runs["none"][1].server.params)


def _batches(m, steps, seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    toks = rng.integers(0, 64, (m, 4, 17))
    yield {"inputs": jnp.asarray(toks[..., :-1], jnp.int32),
           "targets": jnp.asarray(toks[..., 1:], jnp.int32), "mask": jnp.ones((m, 4, 16))}


def test_delayed_clock_order():
  """Per send: the host link receives the previous round's mean first (its exchange overlapped
  the inner phase), the XLA link right after the late outer step; at T the last mean lands and
  is applied."""
  config = tiny_config(**{"algorithm": "islands", "islands.num": 2, "outer.sync_every": 4,
                          "total_steps": 10, "outer.delay": "naive"})
  kinds = lambda clock, done: [e.kind for e in clock.events(done)]
  S, R, M = clock_lib.SEND, clock_lib.RECEIVE, clock_lib.MERGE
  xla = clock_lib.Clock.from_config(config, receive_at_merge=False, delayed=True)
  host = clock_lib.Clock.from_config(config, receive_at_merge=True, delayed=True)
  assert kinds(xla, 4) == [S, M, R] and kinds(xla, 5) == []
  assert kinds(host, 4) == [R, S, M]
  assert kinds(xla, 10) == [S, M, R, M] and kinds(host, 10) == [R, S, M, R, M]
  assert host.in_flight(5) == [0] and host.in_flight(3) == []


@pytest.mark.parametrize("bad,msg", [
    ({"outer.delay": "late"}, "outer.delay='late'"),
    ({"outer.delay": "eager", "outer.overlap": 1}, "leave outer.overlap"),
    ({"outer.delay": "naive", "outer.mixing": 0.5}, "leave outer.mixing"),
    ({"outer.delay": "eager", "outer.eager": True, "outer.overlap": 1}, "leave outer.overlap")])
def test_delayed_bad_options(one_device, bad, msg):
  config = tiny_config(**{"algorithm": "islands", "islands.num": 2, **bad})
  with pytest.raises(ValueError, match=msg):
    engine.build(config, _mesh(one_device), model_lib.ModelConfig.from_config(config.model))


@pytest.mark.slow
def test_eager_kill_mid_phase_resumes_exactly(tmp_path, data_dir):
  """One process, eager (P=2, H=4, int4 with error feedback, host link): SIGKILL after step 7,
  with both fragments' means held or in flight; the re-run resumes from the step-6 checkpoint
  and logs the losses and bytes of an uninterrupted run."""
  args = ["--config", "configs/tiny.py", f"--config.data.data_dir={data_dir}",
          "--config.launch.processes=1", "--config.algorithm=islands", "--config.islands.num=2",
          "--config.outer.sync_every=4", "--config.outer.fragments=2",
          "--config.outer.delay=eager", "--config.outer.compression=int4",
          "--config.outer.quant_block=64", "--config.outer.error_feedback=1.0",
          "--config.outer.transport=host", "--config.checkpoint_every=3"]
  straight = run_cli([*args, "--workdir", str(tmp_path / "straight")])
  assert straight.returncode == 0, straight.stderr[-3000:]
  resumed = str(tmp_path / "resumed")
  killed = run_cli([*args, "--workdir", resumed, "--config.faults.kill=process/0@7"])
  assert killed.returncode != 0
  again = run_cli([*args, "--workdir", resumed])
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed at step 6" in again.stdout + again.stderr
  a = metrics_lib.read_jsonl(os.path.join(tmp_path / "straight", "metrics.jsonl"))
  b = metrics_lib.read_jsonl(os.path.join(resumed, "metrics.jsonl"))
  assert [r["step"] for r in b] == [r["step"] for r in a] and len(a) >= 8
  for ra, rb in zip(a, b):
    for key in ("island_loss", "eval_loss", "island_bytes"):
      if key in ra:
        np.testing.assert_allclose(rb[key], ra[key], rtol=1e-6, err_msg=f"{key} {ra['step']}")
