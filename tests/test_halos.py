"""HALoS (Kim et al. 2025; ``fedjax_lm/outer/halos.py``, ``fedjax_lm/hierarchy.py``): the tiers
on a timing model against an independent numpy event loop written from the paper's algorithm
(workers' SGD, LPS and GPS Delayed Nesterov as the authors' ``opt.py`` writes it, K, alpha,
uneven speeds, a slow WAN), the identities with DiLoCo (one region, K = M, alpha = 1, a
pass-through LPS; and the ``sync`` mode) against the reference DiLoCo, and the refusals."""

import heapq
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from fedjax_lm import config_lib
from fedjax_lm import hierarchy
from fedjax_lm import reference
from fedjax_lm import steps
from fedjax_lm import train
from fedjax_lm.outer import halos


def _init(key):
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (3, 8)), "b1": jnp.zeros(8),
          "w2": 0.5 * jax.random.normal(k2, (8, 1))}


def _loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  return jnp.mean(((h @ params["w2"])[:, 0] - batch["y"]) ** 2)


def _data(num, total, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num, total, 4, 3)).astype(np.float32)
  y = np.sin(x @ np.array([1.0, -2.0, 0.5]) + rng.normal(size=(num, 1, 1))).astype(np.float32)
  return {"x": x, "y": y}


def _feeder(data):
  taken = [0] * data["x"].shape[0]

  def next_batch(w):
    k = taken[w]
    taken[w] += 1
    return {"x": jnp.asarray(data["x"][w, k]), "y": jnp.asarray(data["y"][w, k])}
  return next_batch


def _settings(**over):
  return halos.Settings(**{**halos.DEFAULTS, "regions": 1, **over})


def test_one_region_passing_through_is_diloco(tmp_path):
  """One region of M = 2 workers, K = M, alpha = 1, an LPS that adds the mean (lr 1/M, beta 0,
  every 1), a GPS of Nesterov (every 1) and no WAN delay: the reference DiLoCo's per-step
  losses and final params, AdamW inner steps with warm-up and cosine (rtol 1e-5); the ``sync``
  mode too (with a WAN delay, which costs it time only)."""
  del tmp_path
  num, h, total = 2, 3, 12
  config = tiny_config(**{"algorithm": "islands", "islands.num": num, "total_steps": total,
                          "inner.learning_rate": 0.05, "inner.warmup_steps": 2,
                          "inner.grad_clip": 0.5, "inner.weight_decay": 0.0})
  tx = steps.inner_optimizer(config.inner, total)
  train_step = jax.jit(steps.make_train_step(_loss, tx))
  params = _init(jax.random.key(0))
  data = _data(num, total)
  want_params, want_losses = reference.diloco(
      _loss, params, {k: jnp.asarray(v) for k, v in data.items()}, H=h,
      inner=reference.AdamW.from_config(config.inner, total), outer_lr=0.7, outer_momentum=0.5)
  s = _settings(k=num, alpha=1.0, local_lr=1.0 / num, local_momentum=0.0, local_every=1,
                global_lr=0.7, global_momentum=0.5, global_every=1)
  for mode, wan in (("halos", 0.0), ("sync", 3.0)):  # (a WAN delay lets HALoS's workers go on)
    s = s._replace(wan_seconds=wan)
    got = hierarchy.simulate(mode, num=num, h=h, params=params, init_opt=tx.init,
                             train_step=train_step, next_batch=_feeder(data), budget=num * total,
                             settings=s, outer_tx=optax.sgd(0.7, 0.5, nesterov=True))
    np.testing.assert_allclose(np.array(got.losses).T, want_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 got.params, want_params)
    # each round: H steps and a WAN round trip (the last one ends when the mean arrives)
    assert got.time == pytest.approx(total / h * (h + 2 * wan) - wan)
    assert got.wan_messages == 2 * (total // h) * (1 if mode == "halos" else num)


def _numpy_halos(params, data, *, h, lr_w, speeds, regions, k, alpha, local, glob, wan, budget):
  """The paper's box in numpy: workers take H SGD steps (lr_w) from their LPS's params and send
  delta = start - end; an LPS applies each delta by Delayed Nesterov (the authors' opt.py with
  c = 0) and after K of them sends ref - theta to the GPS (Delayed Nesterov), whose params come
  back after the WAN delay and are merged with weight alpha. Events at the same time are all
  applied before the workers restart."""
  names = sorted(params)
  flat = lambda p: np.concatenate([np.asarray(p[n], np.float64).ravel() for n in names])
  shapes = [np.asarray(params[n]).shape for n in names]

  def unflat(v):
    out, i = {}, 0
    for n, shp in zip(names, shapes):
      size = int(np.prod(shp))
      out[n] = v[i:i + size].reshape(shp)
      i += size
    return out

  def grad(v, batch):
    p = {n: jnp.asarray(x, jnp.float32) for n, x in unflat(v).items()}
    g = jax.grad(_loss)(p, {"x": jnp.asarray(batch[0]), "y": jnp.asarray(batch[1])})
    return flat(g)

  class DN:
    def __init__(self, lr, beta, every, size):
      self.lr, self.beta, self.every, self.t = lr, beta, every, 0
      self.m, self.acc = np.zeros(size), np.zeros(size)

    def step(self, x, g):
      self.acc += g
      if (self.t + 1) % self.every == 0:
        self.m = self.beta * self.m + self.acc / self.every
        x = x - self.lr * (self.beta * self.m + g / self.every)
        self.acc[:] = 0
      else:
        x = x - self.lr * g / self.every
      self.t += 1
      return x

  x0 = flat(params)
  num = len(speeds)
  per = num // regions
  theta = [x0.copy() for _ in range(regions)]
  ref = [x0.copy() for _ in range(regions)]
  lps = [DN(*local, x0.size) for _ in range(regions)]
  gps, gdn = x0.copy(), DN(*glob, x0.size)
  since = [0] * regions
  taken, started, messages = [0] * num, 0, 0
  heap, seq = [], itertools.count()

  def start(w, t):
    nonlocal started
    if started >= budget:
      return
    started += h
    r = w // per
    v = theta[r].copy()
    for _ in range(h):
      v = v - lr_w * grad(v, (data["x"][w, taken[w]], data["y"][w, taken[w]]))
      taken[w] += 1
    heapq.heappush(heap, (t + h / speeds[w], next(seq), "done", (w, theta[r] - v)))

  for w in range(num):
    start(w, 0.0)
  while heap:
    t, ready = heap[0][0], []
    while heap and heap[0][0] <= t:
      _, _, kind, payload = heapq.heappop(heap)
      if kind == "done":
        w, delta = payload
        r = w // per
        theta[r] = lps[r].step(theta[r], delta)
        since[r] += 1
        ready.append(w)
        if since[r] == k:
          heapq.heappush(heap, (t + wan, next(seq), "gps", (r, ref[r] - theta[r])))
          messages += 1
      elif kind == "gps":
        r, delta = payload
        gps = gdn.step(gps, delta)
        heapq.heappush(heap, (t + wan, next(seq), "merge", (r, gps.copy())))
        messages += 1
      else:
        r, big_theta = payload
        theta[r] = (1 - alpha) * theta[r] + alpha * big_theta
        ref[r] = theta[r].copy()
        since[r] = 0
    for w in ready:
      start(w, t)
  for r in range(regions):
    if since[r]:
      gps = gdn.step(gps, ref[r] - theta[r])
      messages += 1
  return unflat(gps), messages


def test_the_tiers_are_the_paper_s_algorithm_in_numpy():
  """2 regions x 2 workers at speeds 1, 0.5, 1, 0.25, H = 3 SGD steps, K = 2, alpha = 0.25,
  LPS Delayed Nesterov (lr 0.6, beta 0.9, every 2), GPS (lr 0.4, beta 0.5, every 2), 1.5 s of
  WAN each way: the GPS's final params equal the numpy event loop's (rtol 1e-4: float32
  against float64 over ~20 events), and so do the WAN messages."""
  num, h, budget = 4, 3, 4 * 12
  speeds = [1.0, 0.5, 1.0, 0.25]
  params = _init(jax.random.key(1))
  data = _data(num, budget)  # more than any worker takes
  s = _settings(regions=2, k=2, alpha=0.25, local_lr=0.6, local_momentum=0.9, local_every=2,
                global_lr=0.4, global_momentum=0.5, global_every=2, wan_seconds=1.5)
  sgd = optax.sgd(0.05)
  train_step = jax.jit(steps.make_train_step(_loss, sgd))
  got = hierarchy.simulate("halos", num=num, h=h, params=params, init_opt=sgd.init,
                           train_step=train_step, next_batch=_feeder(data), budget=budget,
                           speeds=speeds, settings=s)
  want, messages = _numpy_halos(
      params, data, h=h, lr_w=0.05, speeds=speeds, regions=2, k=2, alpha=0.25,
      local=(0.6, 0.9, 2), glob=(0.4, 0.5, 2), wan=1.5, budget=budget)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               got.params, want)
  assert got.wan_messages == messages
  assert got.steps == budget
  # the slow workers ran fewer phases: the fast ones did not wait for them
  assert len(got.losses[0]) > len(got.losses[3])
  # and the result is not the plain initial params or a region's average by accident
  assert not np.allclose(got.params["w1"], params["w1"])


def test_async_mode_applies_each_arrival_after_its_wan_delay():
  """Flat Async Local-SGD: one worker, Delayed Nesterov every 1 with beta 0 and lr 1 is
  plain local SGD restarted from its own result after every WAN round trip (the time is
  phases + 2 x WAN each)."""
  params = _init(jax.random.key(2))
  data = _data(1, 12)
  sgd = optax.sgd(0.05)
  step = jax.jit(steps.make_train_step(_loss, sgd))
  from fedjax_lm.outer import delayed  # pylint: disable=g-import-not-at-top
  got = hierarchy.simulate("async", num=1, h=4, params=params, init_opt=sgd.init,
                           train_step=step, next_batch=_feeder(data), budget=12,
                           settings=_settings(wan_seconds=2.0),
                           outer_tx=delayed.delayed_nesterov(1.0, 0.0, 1))
  p, o = params, sgd.init(params)
  feed = _feeder(data)
  for _ in range(12):
    p, o, _, _ = step(p, o, feed(0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got.params, p)
  assert got.time == pytest.approx(3 * 4 + 2 * 2.0 * 2 + 2.0)  # 3 phases, 2 round trips, 1 way
  assert got.wan_messages == 6
  # at equal time: phases start at 0 and 8 s; the one due at 16 s is past max_time
  limited = hierarchy.simulate("async", num=1, h=4, params=params, init_opt=sgd.init,
                               train_step=step, next_batch=_feeder(data), budget=10**9,
                               settings=_settings(wan_seconds=2.0), max_time=16.0,
                               outer_tx=delayed.delayed_nesterov(1.0, 0.0, 1))
  assert (limited.steps, limited.time) == (8, 14.0)


@pytest.mark.parametrize("over,match", [
    ({"outer.halos_regions": 3}, "divide islands.num"),
    ({"outer.halos_regions": 2, "outer.halos_alpha": 1.5}, "halos_alpha"),
    ({"outer.halos_regions": 2, "outer.halos_k": 0}, "must be >= 1"),
    ({"outer.halos_regions": 2, "outer.halos_wan_seconds": -1.0}, "halos_wan_seconds"),
])
def test_bad_halos_settings_are_one_clear_line(over, match):
  config = tiny_config(**{"algorithm": "islands", "islands.num": 4, **over})
  with pytest.raises(ValueError, match=match):
    config_lib.validate(config)


def test_the_training_loop_refuses_halos_and_names_its_tool(tmp_path):
  config = tiny_config(**{"algorithm": "islands", "islands.num": 2, "outer.halos_regions": 1,
                          "launch.mode": "none", "launch.processes": 1})
  with pytest.raises(ValueError, match="experiments.halos"):
    train.train(config, str(tmp_path))
