"""Decoupled ``outer.policy=async`` (Async Local-SGD, Liu et al. 2024, arXiv 2401.09135):
Delayed Nesterov against a numpy reference of the paper's algorithm over a stream of stale
arrivals, dynamic local updates' H per speed, the syncer's staleness record for a scripted
arrival order (and its global params against the reference), no update applied after the run's
tokens are in, the speed emulation slowing compute only, and an end-to-end run with a slow
island."""

import itertools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import golden
from conftest import run_cli, tiny_config
from fedjax_lm import metrics as metrics_lib
from fedjax_lm import wire
from fedjax_lm.decoupled import island as island_lib
from fedjax_lm.decoupled import syncer as syncer_lib
from fedjax_lm.outer import delayed

SECRET = b"a" * 32


def _paper_dn(x, arrivals, lr, beta, n):
  """Delayed Nesterov, the paper's Algorithm 3 with momentum activation c = 0 (its default):
  every arrival g: buffer += g; on the N-th: m <- beta m + buffer / N, x <- x - lr (beta m +
  g / N), buffer <- 0; otherwise x <- x - lr g / N (m unchanged). Returns every iterate."""
  m, buf, out = np.zeros_like(x), np.zeros_like(x), []
  for t, g in enumerate(arrivals, 1):
    buf = buf + g
    if t % n == 0:
      m = beta * m + buf / n
      x = x - lr * (beta * m + g / n)
      buf = np.zeros_like(x)
    else:
      x = x - lr * g / n
    out.append(x)
  return out


def test_delayed_nesterov_is_the_paper_s_algorithm_over_stale_arrivals():
  """3 workers on 0.5 |w - y_k|^2 (inner SGD, H steps from the params each pulled), arriving
  in a scripted order, so every pseudo-gradient is computed from stale params; 11 arrivals
  (not a multiple of N = 3): the transform's iterates are the reference's."""
  rng = np.random.default_rng(0)
  y = rng.normal(size=(3, 6)).astype(np.float32)
  order = [0, 1, 2, 0, 0, 1, 2, 2, 1, 0, 2]
  dn = delayed.delayed_nesterov(0.7, 0.9, every=3)
  x = jnp.zeros(6)
  state = dn.init(x)
  pulled = {k: np.zeros(6, np.float32) for k in range(3)}
  arrivals, got = [], []
  for k in order:
    local = pulled[k].copy()
    for _ in range(4):
      local -= 0.3 * (local - y[k])
    g = pulled[k] - local
    arrivals.append(g)
    u, state = dn.update(jnp.asarray(g), state, x)
    x = optax.apply_updates(x, u)
    got.append(np.asarray(x))
    pulled[k] = np.asarray(x)  # the worker pulls the new global after its send
  want = _paper_dn(np.zeros(6, np.float32), arrivals, 0.7, 0.9, 3)
  np.testing.assert_allclose(np.stack(got), np.stack(want), rtol=1e-5, atol=1e-6)


def test_dynamic_local_steps_follow_each_island_s_speed():
  """H_k = floor(H v_k / max v) over the live islands (v = 1 / seconds per step), at least 1,
  at most H; H until the island and every live island reported; an island that is not live
  (left, or never joined) does not set the pace."""
  h = 8
  step_s = {0: 0.1, 1: 0.1, 2: 0.1, 3: 0.4}  # speeds 1, 1, 1, 0.25
  assert [syncer_lib.dynamic_local_steps(h, step_s, k) for k in range(4)] == [8, 8, 8, 2]
  assert syncer_lib.dynamic_local_steps(h, {0: 0.1, 1: 0.18}, 1) == 4  # floor(4.44)
  assert syncer_lib.dynamic_local_steps(h, {0: 0.1, 1: 10.0}, 1) == 1
  assert syncer_lib.dynamic_local_steps(h, {0: 0.1}, 1, live={0, 1}) == h  # 1: no speed yet
  assert syncer_lib.dynamic_local_steps(h, {0: 0.1, 1: 0.0}, 0) == h
  fast_but_gone = {0: 0.1, 1: 0.4, 9: 0.001}
  assert syncer_lib.dynamic_local_steps(h, fast_but_gone, 0, live={0, 1}) == 8
  assert syncer_lib.dynamic_local_steps(h, fast_but_gone, 1, live={0, 1}) == 2
  with pytest.raises(ValueError, match="sync_every"):
    syncer_lib.dynamic_local_steps(0, step_s, 0)


def test_speed_emulation_slows_compute_only():
  """A step's compute of 0.1 s at speed 0.25 sleeps 0.3 s; the exchange with the syncer is
  timed outside it, so a long wait for the syncer is never multiplied; the measured seconds
  per step is an EMA of compute + slowdown."""
  assert island_lib.slowdown_s(0.1, 0.25) == pytest.approx(0.3)
  assert island_lib.slowdown_s(0.1, 1.0) == 0.0
  with pytest.raises(ValueError, match="islands.speed"):
    island_lib.slowdown_s(0.1, 0.0)
  # islands.step_seconds: the step padded to pace / speed of wall time, whatever the compute
  assert island_lib.slowdown_s(0.1, 0.25, pace_s=0.5) == pytest.approx(1.9)
  assert island_lib.slowdown_s(0.1, 1.0, pace_s=0.5) == pytest.approx(0.4)
  assert island_lib.slowdown_s(0.7, 1.0, pace_s=0.5) == 0.0  # compute alone took longer
  assert island_lib.step_seconds(0.0, 0.4) == 0.4
  assert island_lib.step_seconds(0.4, 1.4) == pytest.approx(0.5)


def test_async_islands_follow_the_run_s_lr_schedule_not_their_own_step_count():
  """at_schedule_step moves the inner lr schedule to the run's progress (the next update is
  taken at schedule(progress)) and leaves Adam's own count (bias correction) alone."""
  from fedjax_lm import config_lib, steps  # pylint: disable=g-import-not-at-top
  from fedjax_lm.engine import state as state_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.base_config().inner
  tx = steps.inner_optimizer(cfg, 100)
  params = {"w": jnp.ones((1, 3))}
  opt = jax.vmap(tx.init)(params)  # [M = 1] like the engine's islands
  zero = jax.tree.map(jnp.zeros_like, params)
  for _ in range(3):  # the island took 3 steps of its own (zero gradients: moments stay 0)
    _, opt = jax.vmap(tx.update)(zero, opt, params)
  islands = state_lib.Islands(params, opt, state_lib.Absent(), state_lib.Absent(), None)
  moved = island_lib.at_schedule_step(islands, jnp.int32(60)).opt_state
  counts = lambda s, kind: [x.count for x in jax.tree.leaves(
      s, is_leaf=lambda x: isinstance(x, kind)) if isinstance(x, kind)]
  assert [int(c[0]) for c in counts(moved, optax.ScaleByScheduleState)] == [60]
  assert [int(c[0]) for c in counts(moved, optax.ScaleByAdamState)] == [3]
  # with zero gradients and moments, AdamW's update is -lr(count) * weight_decay * w
  got, _ = jax.vmap(tx.update)(zero, jax.tree.map(lambda x: x, moved), params)
  lr = steps.learning_rate_schedule(cfg, 100)
  adam_free = -float(lr(60)) * cfg.weight_decay * 1.0
  np.testing.assert_allclose(np.asarray(got["w"]), adam_free, rtol=1e-5, atol=1e-9)


def test_async_staleness_counts_updates_since_the_pull():
  assert syncer_lib.async_staleness(5, 5) == 0
  assert syncer_lib.async_staleness(7, 3) == 4
  assert syncer_lib.async_staleness(3, 7) == 0  # pulled before the syncer's restore point
  with pytest.raises(wire.WireError, match="pulled version -1"):
    syncer_lib.async_staleness(3, -1)


# ----------------------------------------------------------------- the syncer, in process
_COUNTER = itertools.count(1)


def _call(syncer, method, kind, meta, arrays=()):
  """A method of the syncer as the channel calls it (the caller authenticated as the island
  its request names; each request with the next counter)."""
  del kind
  return syncer.methods()[method].fn(f"island/{meta['island']}",
                                     {**meta, "counter": next(_COUNTER)}, list(arrays))


def test_syncer_async_staleness_params_and_stop_for_a_scripted_arrival_order(tmp_path,
                                                                             data_dir):
  """2 islands, H = 4, 16 steps, Delayed Nesterov with N = 2. A scripted order of sends and
  pulls: each update's recorded staleness is the number applied since its sender pulled; the
  global params are the paper's DN over the payloads in arrival order; DyLU's H from the
  heartbeats ignores an island that is not a member; once the islands' applied steps reach
  16 x 2 the final eval is written and a further send is not applied (the island is told to
  stop)."""
  config = tiny_config(**{**golden.overrides("diloco", data_dir), "launch.mode": "decoupled",
                          "outer.policy": "async", "eval_every": 16})
  syncer = syncer_lib.Syncer(config, str(tmp_path), SECRET)
  fp = syncer.fingerprint
  for k in (0, 1):
    _, meta, _ = _call(syncer, "Join", "join", {"island": k, "fingerprint": fp})
    assert meta["version"] == 0
  layout = jax.tree.leaves(syncer._sent[0])
  start = [np.asarray(x) for x in syncer._take[0](syncer.server.params)]
  rng = np.random.default_rng(1)
  pulled = {0: 0, 1: 0}
  arrivals = []

  def send(k, local_steps=4):
    payload = [(0.01 * rng.normal(size=a.shape)).astype(a.dtype) for a in layout[:-1]]
    weight = np.ones(layout[-1].shape, layout[-1].dtype)
    _, reply, _ = _call(syncer, "Send", "send", {
        "island": k, "fragment": 0, "step": 4, "version": pulled[k], "data": "",
        "local_steps": local_steps}, payload + [weight])
    return payload, reply

  def pull(k):
    _, meta, _ = _call(syncer, "Receive", "receive", {"island": k, "fragment": 0, "step": 4})
    pulled[k] = meta["version"]
    return meta

  with pytest.raises(wire.WireError, match="needs the version"):
    _call(syncer, "Send", "send", {"island": 0, "fragment": 0, "step": 4, "local_steps": 1},
          [np.zeros(a.shape, a.dtype) for a in layout])
  assert syncer.version == 0
  # island 0 sends, pulls; island 1 (still at v0) sends; 0 sends twice; 1 pulls and sends
  script = [("send", 0), ("pull", 0), ("send", 1), ("send", 0), ("pull", 0), ("send", 0),
            ("pull", 1), ("send", 1)]
  for what, k in script:
    if what == "send":
      arrivals.append(send(k)[0])
    else:
      pull(k)
  updates = metrics_lib.read_jsonl(os.path.join(tmp_path, "updates.jsonl"))
  assert [(u["island"], u["staleness"]) for u in updates] == [
      (0, 0), (1, 1), (0, 1), (0, 0), (1, 0)]
  assert [u["version"] for u in updates] == [1, 2, 3, 4, 5]

  flat = lambda leaves: np.concatenate([np.asarray(a).reshape(-1) for a in leaves])
  iterates = _paper_dn(flat(start), [flat(p) for p in arrivals], 0.7, 0.9, 2)
  got = flat(syncer._take[0](syncer.server.params))
  np.testing.assert_allclose(got, iterates[-1], rtol=1e-5, atol=1e-6)

  # checkpoints every islands.num = 2 updates, not on every send: a syncer restarted now
  # resumes at update 4 (the 5th is lost), with the params and DN state after 4 arrivals
  assert json.load(open(tmp_path / "progress.json"))["checkpoints"] == 2
  syncer.flush()  # (saves are written on orbax's thread)
  again = tmp_path / "restarted"  # (a copy: the first syncer goes on below)
  shutil.copytree(tmp_path / "syncer_checkpoints", again / "syncer_checkpoints")
  restarted = syncer_lib.Syncer(config, str(again), SECRET)
  assert restarted.version == 4
  np.testing.assert_allclose(flat(restarted._take[0](restarted.server.params)), iterates[3],
                             rtol=1e-5, atol=1e-6)
  # its Delayed Nesterov state came back too: the lost 5th arrival, resent, lands on the
  # reference's 5th iterate
  weight = np.ones(layout[-1].shape, layout[-1].dtype)
  _call(restarted, "Send", "send", {"island": 1, "fragment": 0, "step": 4, "version": 4,
                                    "data": "", "local_steps": 4}, arrivals[4] + [weight])
  np.testing.assert_allclose(flat(restarted._take[0](restarted.server.params)), iterates[4],
                             rtol=1e-5, atol=1e-6)
  restarted.close()

  # DyLU: island 1 at a quarter of island 0's speed (an island outside the run, e.g. 7, has
  # no key: the channel refuses it, tests/test_channel_attacks.py)
  for k, s in ((0, 0.1), (1, 0.4)):
    _call(syncer, "Heartbeat", "heartbeat", {"island": k, "step_s": s})
  assert pull(0)["local_steps"] == 4 and pull(1)["local_steps"] == 1
  assert pull(0)["progress"] == 5 * 4 // 2  # applied inner steps per island

  # an island may not claim more inner steps than the H it was told (the red team ended the
  # run with local_steps=1e9)
  with pytest.raises(wire.WireError, match="local_steps"):
    send(0, local_steps=10 ** 9)
  # the run's tokens: 5 x 4 + 3 x 4 = 32 = 2 islands x 16 steps -> the final eval, then stop
  for _ in range(3):
    assert not syncer.done
    send(0)
  syncer.flush()  # (evals run on their own thread)
  evals = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert evals[-1]["step"] == 16 and evals[-1]["rounds"] == 8 and syncer.done
  before = flat(syncer._take[0](syncer.server.params))
  _, reply = send(1)
  assert reply["stop"] is True and syncer.version == 8
  assert len(metrics_lib.read_jsonl(os.path.join(tmp_path, "updates.jsonl"))) == 8
  np.testing.assert_array_equal(flat(syncer._take[0](syncer.server.params)), before)
  assert pull(1)["stop"] is True
  syncer.close()


# ----------------------------------------------------------------- end to end
@pytest.mark.slow
def test_async_run_with_a_slow_island_runs_dylu_h_and_stays_fresh(tmp_path, data_dir):
  """3 island jobs at speeds 1, 1, 0.25 (H = 8, 48 steps), policy async: the fast islands
  run about H between sends and the slow one about H / 4 (it used to be H = 1 for the fast
  ones: the measured speed included the wait for the syncer), staleness stays within a few
  updates, nothing is applied after the final eval, and the final eval sees the run's
  tokens (3 x 48 island-steps). Steps are paced (``islands.step_seconds``) so the emulated
  hardware, not the contention of 4 processes on a 2-core CI machine, sets the speeds: unpaced,
  a fast island once measured 2.6x slower than its twin and ran H = 3."""
  overrides = {**golden.overrides("diloco", data_dir), "launch.mode": "decoupled",
               "outer.policy": "async", "islands.num": 3, "islands.speed": "1,1,0.25",
               "outer.sync_every": 8, "total_steps": 48, "eval_every": 48,
               "islands.step_seconds": 0.2, "launch.heartbeat_seconds": 5}
  result = run_cli(["--config", "configs/tiny.py", "--workdir", str(tmp_path),
                    *(f"--config.{k}={v}" for k, v in overrides.items())], timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  updates = metrics_lib.read_jsonl(os.path.join(tmp_path, "updates.jsonl"))
  evals = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert evals[-1]["step"] == 48 and np.isfinite(evals[-1]["eval_loss"])
  assert max(u["version"] for u in updates) == evals[-1]["rounds"] == len(updates)
  assert sum(u["local_steps"] for u in updates) >= 3 * 48
  median_h = {k: np.median([u["local_steps"] for u in updates if u["island"] == k])
              for k in range(3)}
  assert median_h[0] >= 5 and median_h[1] >= 5, median_h
  assert 1 <= median_h[2] <= 3, median_h
  assert max(u["staleness"] for u in updates) <= 6, [u["staleness"] for u in updates]
  assert json.load(open(tmp_path / "roles.json"))


def test_async_syncer_with_heloco_corrects_each_stale_arrival(tmp_path, data_dir):
  """``outer.optimizer=heloco`` with ``outer.policy=async``: the syncer's Delayed Nesterov
  takes each arrival corrected per parameter leaf against its momentum, as the numpy reference
  of the paper's rule (tests/test_heloco.py) followed by the paper's DN gives; arrivals
  turned against the momentum make it differ from plain Delayed Nesterov."""
  from test_heloco import DEFAULTS, _rule  # pylint: disable=import-outside-toplevel
  config = tiny_config(**{**golden.overrides("diloco", data_dir), "launch.mode": "decoupled",
                          "outer.policy": "async", "outer.optimizer": "heloco",
                          "outer.hparams_for": "heloco", "outer.learning_rate": 0.7,
                          "outer.momentum": 0.9, "eval_every": 1000})
  syncer = syncer_lib.Syncer(config, str(tmp_path), SECRET)
  for k in (0, 1):
    _call(syncer, "Join", "join", {"island": k, "fingerprint": syncer.fingerprint})
  layout = jax.tree.leaves(syncer._sent[0])
  start = [np.asarray(x, np.float64) for x in syncer._take[0](syncer.server.params)]
  rng = np.random.default_rng(3)
  arrivals = []
  for t in range(6):  # from the 3rd on, every other arrival against the last one
    payload = [(0.01 * rng.normal(size=a.shape)).astype(a.dtype) for a in layout[:-1]]
    if t >= 2 and t % 2:
      payload = [(-2.0 * p + 0.001 * rng.normal(size=p.shape)).astype(p.dtype)
                 for p in arrivals[-1]]
    arrivals.append(payload)
    _call(syncer, "Send", "send", {"island": t % 2, "fragment": 0, "step": 4,
                                   "version": syncer.version, "data": "", "local_steps": 4},
          payload + [np.ones(layout[-1].shape, layout[-1].dtype)])
  lr, beta, n = 0.7, 0.9, 2
  x, m, buf = start, [np.zeros_like(a) for a in start], [np.zeros_like(a) for a in start]
  plain = _paper_dn(np.concatenate([a.reshape(-1) for a in start]),
                    [np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in g])
                     for g in arrivals], lr, beta, n)[-1]
  corrected = 0
  for t, g in enumerate(arrivals, 1):
    g = [np.asarray(gi, np.float64).reshape(xi.shape) for gi, xi in zip(g, x)]
    fixed = [_rule(gi, (1 - beta) * mi, **DEFAULTS) for gi, mi in zip(g, m)]
    corrected += sum(regime in ("anti", "weak") for _, regime in fixed)
    g = [f for f, _ in fixed]
    buf = [b + gi for b, gi in zip(buf, g)]
    if t % n == 0:
      m = [beta * mi + b / n for mi, b in zip(m, buf)]
      x = [xi - lr * (beta * mi + gi / n) for xi, mi, gi in zip(x, m, g)]
      buf = [np.zeros_like(b) for b in buf]
    else:
      x = [xi - lr * gi / n for xi, gi in zip(x, g)]
  got = [np.asarray(a) for a in syncer._take[0](syncer.server.params)]
  for a, b in zip(got, x):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert corrected > 0
  flat = np.concatenate([a.reshape(-1) for a in got])
  assert np.max(np.abs(flat - plain)) > 1e-4  # (not plain Delayed Nesterov)
  syncer.close()
