"""The token-weighted merge of islands of different sizes (Decoupled DiLoCo, arXiv 2604.21428;
``fedjax_lm/decoupled/tokens.py``): the syncer's round mean against numpy written from the
paper's rule (delta = sum_k w_k delta_k / sum_k w_k, w_k the tokens island k processed), the
identity with DiLoCo's mean for equal islands, absent islands weighing nothing, weights an
island cannot choose, and the config refusals."""

import itertools

import jax
import numpy as np
import pytest

import golden
from conftest import tiny_config
from fedjax_lm import config_lib
from fedjax_lm.decoupled import syncer as syncer_lib
from fedjax_lm.decoupled import tokens

SECRET = b"t" * 32
_COUNTER = itertools.count(1)


def _syncer(tmp_path, data_dir, **over):
  config = tiny_config(**{**golden.overrides("diloco", data_dir), "launch.mode": "decoupled",
                          **over})
  config_lib.validate(config)
  syncer = syncer_lib.Syncer(config, str(tmp_path), SECRET)
  for k in range(int(config.islands.num)):
    _call(syncer, "Join", k, {"fingerprint": syncer.fingerprint})
  return syncer, config


def _call(syncer, method, island, meta, arrays=()):
  return syncer.methods()[method].fn(f"island/{island}", {
      "island": island, "counter": next(_COUNTER), **meta}, list(arrays))


def _payload(syncer, seed, weight=1.0):
  layout = jax.tree.leaves(syncer._sent[0])  # pylint: disable=protected-access
  rng = np.random.default_rng(seed)
  return ([(0.01 * rng.normal(size=a.shape)).astype(a.dtype) for a in layout[:-1]] +
          [np.full((1, 1), weight, np.float32)])


def _round_mean(syncer, payloads):
  """Sends island k's payload for the first round; returns the closed round's mean leaves."""
  step = syncer._next_send(0)  # pylint: disable=protected-access
  for k, arrays in enumerate(payloads):
    _call(syncer, "Send", k, {"fragment": 0, "step": step}, arrays)
  assert syncer.closed[0] == step
  return [np.array(a) for a in syncer.after_round[0][step].arrays[:-2]]


def test_the_round_mean_is_the_token_weighted_mean_of_the_paper(tmp_path, data_dir):
  """3 islands with 4, 2 and 6 rows per step: the syncer's mean equals numpy's
  sum_k w_k delta_k / sum_k w_k with w_k = rows_k x seq_len x H (rtol 1e-6)."""
  syncer, config = _syncer(tmp_path, data_dir, **{
      "islands.num": 3, "islands.batch_sizes": "4,2,6", "outer.merge": "tokens"})
  h, seq = int(config.outer.sync_every), int(config.data.seq_len)
  w = np.array([4, 2, 6], np.float64) * seq * h
  assert tokens.weights(config) == list(w)
  payloads = [_payload(syncer, seed) for seed in range(3)]
  mean = _round_mean(syncer, payloads)
  for i, got in enumerate(mean):
    want = sum(wk * p[i].astype(np.float64)[0] for wk, p in zip(w, payloads)) / w.sum()
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-6, atol=1e-9)
  # not the plain mean
  plain = sum(p[0].astype(np.float64)[0] for p in payloads) / 3
  assert not np.allclose(mean[0].reshape(plain.shape), plain, rtol=1e-3)
  syncer.close()


def test_equal_islands_weighted_by_tokens_are_diloco_s_mean_bit_for_bit(tmp_path, data_dir):
  """Equal islands weigh 1 each: outer.merge=tokens is the mean, to the bit, and the global
  params after the round are the same."""
  out = {}
  for merge in ("mean", "tokens"):
    syncer, _ = _syncer(tmp_path / merge, data_dir, **{"outer.merge": merge})
    out[merge] = (_round_mean(syncer, [_payload(syncer, s) for s in (0, 1)]),
                  [np.array(x) for x in jax.tree.leaves(syncer.server.params)])
    syncer.close()
  for a, b in zip(jax.tree.leaves(out["mean"]), jax.tree.leaves(out["tokens"])):
    np.testing.assert_array_equal(a, b)


def test_an_absent_island_weighs_nothing(tmp_path, data_dir):
  """Island 1 (twice island 0's rows) sends weight 0 (absent): the mean is island 0's own."""
  syncer, _ = _syncer(tmp_path, data_dir, **{"islands.batch_sizes": "4,8",
                                             "outer.merge": "tokens"})
  mine = _payload(syncer, 0)
  absent = [np.zeros_like(a) for a in _payload(syncer, 1)[:-1]] + [np.zeros((1, 1), np.float32)]
  mean = _round_mean(syncer, [mine, absent])
  for got, want in zip(mean, mine[:-1]):
    np.testing.assert_allclose(got.reshape(want[0].shape), want[0], rtol=1e-6)
  syncer.close()


def test_an_island_cannot_choose_its_weight(tmp_path, data_dir):
  """The weights are the config's (shared through the join fingerprint); a send claiming
  more than 1 is refused and the round still waits for that island."""
  syncer, _ = _syncer(tmp_path, data_dir, **{"islands.batch_sizes": "4,2",
                                             "outer.merge": "tokens"})
  step = syncer._next_send(0)  # pylint: disable=protected-access
  with pytest.raises(Exception, match="weight"):
    _call(syncer, "Send", 1, {"fragment": 0, "step": step}, _payload(syncer, 1, weight=1e6))
  assert step not in syncer.rounds[0] or 1 not in syncer.rounds[0][step].senders
  syncer.close()


@pytest.mark.parametrize("over,match", [
    ({"islands.batch_sizes": "4,2"}, "need launch.mode=decoupled"),
    ({"launch.mode": "decoupled", "islands.batch_sizes": "4,2,2"}, "expected one per island"),
    ({"launch.mode": "decoupled", "islands.batch_sizes": "4,x"}, "positive integers"),
    ({"launch.mode": "decoupled", "islands.batch_sizes": "4,3", "islands.devices": "2,2"},
     "not a multiple of its 2 devices"),
    ({"launch.mode": "decoupled", "islands.devices": "2,1", "outer.compression": "int8"},
     "lays its blocks out per device"),
    ({"launch.mode": "decoupled", "outer.merge": "tokens", "outer.policy": "async"},
     "needs outer.policy=sync"),
    ({"outer.merge": "median"}, "outer.merge='median'"),
])
def test_bad_island_sizes_are_one_clear_line(over, match):
  config = tiny_config(**{"algorithm": "islands", "islands.num": 2, **over})
  with pytest.raises(ValueError, match=match):
    config_lib.validate(config)


def _reference_losses(config, batches, weights):
  """The reference DiLoCo (``fedjax_lm.reference``, plain jax.numpy) on the tiny model from
  the syncer's initial params: every island's per-step loss, ``[steps, M]``."""
  import functools  # pylint: disable=g-import-not-at-top
  from fedjax_lm import model as model_lib, outer, reference, steps  # pylint: disable=g-import-not-at-top
  model_cfg = model_lib.ModelConfig.from_config(config.model)
  graphdef, _ = model_lib.build(model_cfg)
  params0 = model_lib.init_params(model_cfg, jax.random.key(int(config.seed)))
  hp = outer.resolved_hparams(config.outer)
  _, losses = reference.diloco(
      functools.partial(steps.mean_loss, graphdef), params0, batches,
      H=int(config.outer.sync_every),
      inner=reference.AdamW.from_config(config.inner, int(config.total_steps)),
      outer_lr=float(hp["learning_rate"]), outer_momentum=float(hp["momentum"]),
      weights=weights)
  return np.asarray(losses)


def _island_batches(config, k, sizes):
  """Island k's first ``total_steps`` batches as its job reads them (its own rows)."""
  from fedjax_lm import data as data_lib, input as input_lib, mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  one = syncer_lib.island_config(config)
  one.data.batch_size = sizes[k]
  mesh = mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  batches = input_lib.TrainBatches(one.data, mesh, num_islands=1, seed=int(config.seed),
                                   tokenizer=data_lib.get_tokenizer(config.data.tokenizer),
                                   part=(k, len(sizes)))
  rows = [next(batches) for _ in range(int(config.total_steps))]
  return {key: np.stack([np.asarray(r[key])[0] for r in rows]) for key in rows[0]}


@pytest.mark.slow
def test_islands_of_different_devices_and_batches_are_the_weighted_reference(tmp_path,
                                                                            data_dir):
  """Two island jobs, one on 2 devices with 4 rows per step, one on 1 device with 2, and a
  syncer merging by tokens (16 steps, H=4): every island's per-step loss is the reference
  DiLoCo's with step 4 weighted 2 : 1 (rtol 2e-5), and not the unweighted reference's."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from conftest import run_cli  # pylint: disable=g-import-not-at-top
  from fedjax_lm import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  over = {**golden.overrides("diloco", data_dir), "launch.mode": "decoupled",
          "launch.processes": 1, "mesh.data": -1, "islands.devices": "2,1",
          "islands.batch_sizes": "4,2", "outer.merge": "tokens"}
  result = run_cli(["--config", "configs/tiny.py", "--workdir", str(tmp_path),
                    *(f"--config.{k}={v}" for k, v in over.items())], timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  got = np.array([[r["island_loss"] for r in metrics_lib.read_jsonl(
      os.path.join(tmp_path, "islands", str(k), "metrics.jsonl"))] for k in (0, 1)]).T
  events = [json.loads(line) for line in open(tmp_path / "events.jsonl")]
  assert not [e for e in events if e["event"] == "round_closed_without"]
  assert [e["weights"] for e in events if e["event"] == "merge_weights"][0] == [2.0, 1.0]
  config = tiny_config(**over)
  batches = [_island_batches(config, k, [4, 2]) for k in (0, 1)]
  np.testing.assert_allclose(got, _reference_losses(config, batches, [2.0, 1.0]), rtol=2e-5)
  unweighted = _reference_losses(config, batches, None)
  assert not np.allclose(got[4:], unweighted[4:], rtol=1e-4)  # the weights matter


def test_the_study_s_runs_are_decoupled_islands_of_the_sizes_named():
  """experiments/studies/tokens: each row's overrides make a valid decoupled config whose
  islands have the rows, devices and merge the row names, at the quick DiLoCo row's size."""
  from experiments.bench import suites  # pylint: disable=g-import-not-at-top
  from experiments.studies.tokens import run  # pylint: disable=g-import-not-at-top
  for _, sizes, devices, merge in run.ROWS:
    config = suites._config(run.overrides(sizes, devices, merge, 1))  # pylint: disable=protected-access
    config_lib.validate(config)
    assert tokens.batch_sizes(config) == [int(x) for x in sizes.split(",")]
    assert tokens.devices(config) == [int(x) for x in devices.split(",")]
    assert (config.outer.merge, int(config.seed), int(config.outer.sync_every)) == (merge, 1, 50)
