"""fedjax_lm/decoupled/validate.py: what the syncer checks in each field a member sends. Every
attack of the red-team pass (issue 44) by a member that holds a key is refused with one line
naming the culprit, and every value an honest island sends passes: its sends as its own clock
makes them, its data positions as its own iterator writes them."""

import json
import math
import re

import jax
import numpy as np
import pytest

from fedjax_lm import config_lib
from fedjax_lm import data as data_lib
from fedjax_lm import input as input_lib
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import wire
from fedjax_lm.decoupled import validate
from fedjax_lm.engine import clock as clock_lib
from fedjax_lm.engine import merges


def _refused(match):
  return pytest.raises(validate.Refusal, match=match)


# ------------------------------------------------------------------------ ids
@pytest.mark.parametrize("value", [7, 4, -1, 1_000_000, True, 1.5, 1.0, "1", None])
def test_island_id_out_of_range_or_not_an_int_is_refused(value):
  with _refused(r"^island id " + re.escape(repr(value)) + " is "):
    validate.island_id(value, 4)


def test_island_id_in_range_is_kept_as_an_int():
  assert [validate.island_id(v, 4) for v in (0, 3, np.int64(2))] == [0, 3, 2]
  assert type(validate.island_id(np.int64(2), 4)) is int  # pylint: disable=unidiomatic-typecheck
  assert issubclass(validate.Refusal, wire.WireError) and issubclass(validate.Refusal, ValueError)


# ------------------------------------------------------------------------ steps
def _honest_sends(sync_every, fragments, total, delay="none"):
  """(fragment, step) of every send an island makes: its own clock's SEND events, the step
  clamped to T as the remote link does."""
  c = config_lib.base_config()
  c.total_steps, c.islands.num = total, 2
  c.outer.update(sync_every=sync_every, fragments=fragments, delay=delay)
  clock = clock_lib.Clock.from_config(c, receive_at_merge=True, member=1, num=2,
                                      delayed=merges.from_config(c.outer).delayed)
  return {(e.fragment, min(done, total)) for done in range(1, total + 1)
          for e in clock.events(done) if e.kind == clock_lib.SEND}, clock.schedule


@pytest.mark.parametrize("sync_every,fragments,total,delay", [
    (4, 2, 10, "none"),  # streaming, the last round partial (T = 10 flushes fragment 0 too)
    (4, 1, 8, "none"),
    (3, 3, 7, "naive"),  # outer.delay: the island's clock is the delayed one
])
def test_send_step_accepts_exactly_the_sends_of_an_honest_island(sync_every, fragments, total,
                                                                 delay):
  honest, schedule = _honest_sends(sync_every, fragments, total, delay)
  assert honest and any(s == total for _, s in honest)
  for p in range(-1, fragments + 1):
    for s in range(-1, total + 3):
      if (p, s) in honest:
        assert validate.send_step(s, p, fragments, total, schedule.sends, island=1) == (p, s)
      else:
        with _refused(r"^island 1: (step|fragment)="):
          validate.send_step(s, p, fragments, total, schedule.sends, island=1)


def test_send_step_names_what_is_off():
  _, schedule = _honest_sends(4, 2, 10)
  with _refused(r"^island 2: step=3 is off the schedule for fragment 0 .* fragments \[\]"):
    validate.send_step(3, 0, 2, 10, schedule.sends, island=2)
  with _refused(r"^island 2: step=0 is not in \[1, total_steps=10\]"):
    validate.send_step(0, 0, 2, 10, schedule.sends, island=2)
  with _refused(r"^island 2: step=11 is not in \[1, total_steps=10\]"):
    validate.send_step(11, 1, 2, 10, None, island=2)
  with _refused(r"^island 2: fragment=2 is not in \[0, 2\)"):
    validate.send_step(4, 2, 2, 10, schedule.sends, island=2)
  for bad in (True, 4.0, "4", None):
    with _refused(r"^island 2: step=.* not an int"):
      validate.send_step(bad, 0, 2, 10, schedule.sends, island=2)
  # async (sends=None): any step in range, as each island runs its own dynamic H
  assert validate.send_step(7, 0, 1, 10) == (0, 7)


# ------------------------------------------------------------------------ async fields
@pytest.mark.parametrize("value", [1e9, 10**9, 9, -1, True, 4.0, "4", None])
def test_local_steps_out_of_range_or_not_an_int_is_refused(value):
  with _refused(r"^island 1: local_steps=" + re.escape(repr(value))):
    validate.local_steps(value, 1, 8)


def test_local_steps_an_honest_island_reports():
  assert [validate.local_steps(v, 0, 8) for v in (0, 1, 8)] == [0, 1, 8]
  # told: the H the syncer gave the island; 0 before it was given one (a start or restart)
  assert validate.local_steps(3, 0, 8, told=3) == 3 and validate.local_steps(0, 0, 8, told=3) == 0
  with _refused(r"^island 0: local_steps=8 is not the H the syncer gave it \(3\)"):
    validate.local_steps(8, 0, 8, told=3)


def test_step_s_tiny_claim_among_honest_islands_is_refused():
  honest = {0: 0.1, 1: 0.11, 2: 0.4}  # island 2: islands.speed 0.25
  with _refused(r"^island 3: step_s=1e-09 is not in \[1e-06, 86400\] s"):
    validate.step_s(1e-9, 3, honest)
  with _refused(r"^island 3: step_s=0.001 is more than 20x off the other islands' median 0.11"):
    validate.step_s(1e-3, 3, honest)
  with _refused(r"^island 3: step_s=50 is more than 20x off"):
    validate.step_s(50, 3, honest)
  for bad in (math.nan, math.inf, -0.1):
    with _refused(r"^island 3: step_s=.* must be finite and >= 0"):
      validate.step_s(bad, 3, honest)
  for bad in (True, "0.1", None):
    with _refused(r"^island 3: step_s=.* not a number"):
      validate.step_s(bad, 3, honest)


def test_step_s_honest_values_pass():
  honest = {0: 0.1, 1: 0.11, 2: 0.4}
  assert validate.step_s(0.1, 0, honest) == 0.1
  assert validate.step_s(0.4, 2, honest) == 0.4  # a 4x slower island
  assert validate.step_s(0, 3, honest) == 0.0  # none measured yet
  assert validate.step_s(1e-5, 0) == 1e-5  # no other report: the absolute range only
  # an island's own earlier value is not its reference, the others' median is: island 3 was
  # slow (4 s, shared cores) and now runs at the others' speed
  assert validate.step_s(0.1, 3, {0: 0.1, 3: 4.0}) == 0.1
  with _refused("more than 20x off"):
    validate.step_s(1e-5, 3, {**honest, 3: 1e-5})


# ------------------------------------------------------------------------ data positions
def _batches(data_dir, k=1, parts=3):
  c = config_lib.base_config()
  c.data.update(data_dir=data_dir, seq_len=31, batch_size=2)
  mesh = mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 1, "tensor": 1},
                            jax.devices()[:1])
  return input_lib.TrainBatches(c.data, mesh, num_islands=1, seed=0, part=(k, parts),
                                tokenizer=data_lib.get_tokenizer("byte"))


@pytest.fixture(scope="module")
def positions(data_dir):
  """Island 1's data position before each of 60 steps (what it sends), and its batches."""
  batches = _batches(data_dir)
  out, seen = [], []
  for _ in range(60):
    out.append(batches.global_state()["island1"])
    seen.append(np.asarray(next(batches)["inputs"]))
  return out, seen


def test_every_position_an_honest_island_sends_is_accepted_in_order(positions):
  texts, _ = positions
  states = [json.loads(t) for t in texts]
  assert any(s["remainder_slices"]["tokens"] != [-1, -1] for s in states)
  assert states[-1]["parent_state"]["next_index"] > states[0]["parent_state"]["next_index"]
  last = None
  for text in texts:
    assert validate.data_position(text, 1, last) == text
    last = text
  assert validate.data_position("", 1, last) == ""  # no position: nothing kept


def test_an_accepted_position_restores_the_island_s_iterator(positions, data_dir):
  texts, seen = positions
  fresh = _batches(data_dir)
  fresh.set_global_state({"island1": validate.data_position(texts[37], 1, texts[36])})
  assert np.array_equal(np.asarray(next(fresh)["inputs"]), seen[37])


def _poisoned(text):
  good = json.loads(text)
  with_ = lambda **kw: json.dumps({**good, **kw})
  return {
      "not json": "{oops",
      "nan": text.replace(str(good["elements_from_buffer_after_checkpoint"]), "NaN", 1),
      "a list": "[1, 2]",
      "an extra key": with_(x=1),
      "a key missing": json.dumps({k: v for k, v in good.items() if k != "parent_state"}),
      "a duplicate key": text[:-1] + ', "parent_state": {"next_index": 0}}',
      "a negative index": with_(parent_state={"next_index": -5}),
      "a float index": with_(parent_state={"next_index": 3.0}),
      "a str index": with_(parent_state={"next_index": "3"}),
      "a bool index": with_(parent_state={"next_index": True}),
      "a huge index": with_(parent_state={"next_index": 2**60}),
      "an extra parent key": with_(parent_state={"next_index": 3, "x": 1}),
      "a replay of 10^7 windows": with_(elements_from_buffer_after_checkpoint=10**7),
      "negative windows": with_(elements_from_buffer_after_checkpoint=-1),
      "a reversed slice": with_(remainder_slices={"tokens": [10, 2]}),
      "an empty slice": with_(remainder_slices={"tokens": [4, 4]}),
      "a negative slice": with_(remainder_slices={"tokens": [-3, 2]}),
      "a 3-slice": with_(remainder_slices={"tokens": [1, 2, 3]}),
      "another feature": with_(remainder_slices={"tokens": [1, 2], "x": [1, 2]}),
      "too long": with_(pad="x" * validate.MAX_POSITION_CHARS),
  }


def test_poisoned_positions_are_refused_naming_the_island(positions):
  texts, _ = positions
  for name, bad in _poisoned(texts[20]).items():
    with _refused(r"^island 1: data="):
      validate.data_position(bad, 1)
      pytest.fail(f"{name} accepted")
  for bad in (None, 7, b"{}"):
    with _refused(r"^island 1: data=.* not a str"):
      validate.data_position(bad, 1)


def test_a_position_that_moves_back_is_refused(positions):
  texts, _ = positions
  assert (json.loads(texts[50])["parent_state"]["next_index"] >
          json.loads(texts[5])["parent_state"]["next_index"])
  with _refused(r"^island 1: data=.* moves back: next_index \d+ < \d+"):
    validate.data_position(texts[5], 1, last=texts[50])
  assert validate.data_position(texts[50], 1, last="not a position") == texts[50]


def test_what_is_refused_would_break_the_restarted_island(positions, data_dir):
  """The restore an island runs on rejoin fails on what the validator refuses (so the
  validator, not the restarted island, is where a poisoned position stops)."""
  texts, _ = positions
  poisoned = _poisoned(texts[20])
  for name in ("not json", "a negative index", "a float index", "an extra key"):
    restarted = _batches(data_dir)
    with pytest.raises((ValueError, TypeError, IndexError)):
      restarted.set_global_state({"island1": poisoned[name]})
      next(restarted)


# ------------------------------------------------------------------------ payload norms
def _gate_with_history(norms=(1.0, 1.1, 0.9, 1.05), **kw):
  gate = validate.NormGate(**kw)
  for n in norms:
    gate.check(0, 0, n, True)
    gate.accept(0, n)
  return gate


def test_a_1e30_payload_is_refused_and_not_recorded():
  gate = _gate_with_history()
  before = gate.to_json()
  with _refused(r"^island 2: fragment 0 payload norm=1e\+30 exceeds 10 x the median 1.025 of "
                r"the last 4 accepted"):
    gate.check(2, 0, 1e30, True)
  assert gate.to_json() == before
  gate.check(0, 0, 1.2, True)  # the honest ones of the same round still pass
  gate.accept(0, 1.2)
  assert gate.history(0)[-1] == 1.2 and 1e30 not in gate.history(0)


def test_the_norm_of_real_1e30_values():
  norm, finite = validate.norm_of([np.full((4, 3), 1e30, np.float32), np.ones(5, np.float32)])
  assert finite and norm == pytest.approx(1e30 * math.sqrt(12), rel=1e-5)
  with _refused(r"^island 1: fragment 0 payload norm=3\.464e\+30 exceeds"):
    _gate_with_history().check(1, 0, norm, finite)
  assert validate.norm_of([np.array([3.0, 4.0], np.float32)]) == (5.0, True)
  assert validate.norm_of([np.zeros(3, np.float32)]) == (0.0, True)


def test_one_nan_is_refused_even_with_no_history_and_the_norm_check_off():
  norm, finite = validate.norm_of([np.array([1.0, np.nan], np.float32)])
  assert not finite
  for gate in (validate.NormGate(), _gate_with_history(), validate.NormGate(bound=0)):
    with _refused(r"^island 3: fragment 1 payload has non-finite values"):
      gate.check(3, 1, norm, finite)
  with _refused(r"^island 3: fragment 1 payload norm=inf \(it overflows\)"):
    validate.NormGate(bound=0).check(3, 1, math.inf, True)  # float32 sum of squares overflowed


def test_first_rounds_pass_and_a_growing_norm_within_the_bound_passes():
  gate = validate.NormGate(bound=10, window=8)
  gate.check(0, 0, 5e3, True)  # no history yet: finiteness only
  assert gate.median(0) is None
  # inner lr warm-up from 0: round r's pseudo-gradient ~ its mean lr ~ 2r - 1; two islands
  gate = validate.NormGate(bound=10, window=8)
  for r in range(1, 30):
    for norm in (2 * r - 1, 1.1 * (2 * r - 1)):
      gate.check(0, 0, norm, True)
      gate.accept(0, norm)
  assert len(gate.history(0)) == 8 and gate.history(0)[-1] == pytest.approx(1.1 * 57)
  gate = validate.NormGate(bound=10, window=8)
  for k in range(40):  # even 1.6x per accepted payload, sustained, passes (the median lags 4)
    gate.check(0, 0, 1.6**k, True)
    gate.accept(0, 1.6**k)
  gate, refused = validate.NormGate(bound=10, window=8), []
  for k in range(12):  # 2x per payload does not: 16x over the lag
    try:
      gate.check(0, 0, 2.0**k, True)
      gate.accept(0, 2.0**k)
    except validate.Refusal:
      refused.append(k)
  assert refused == list(range(6, 12))


def test_the_bound_follows_the_recent_window_and_zero_norms_are_not_recorded():
  gate = _gate_with_history([100.0] * 8, window=8)
  for _ in range(8):  # training settles: norms fall to 20, each within the bound
    gate.check(0, 0, 20.0, True)
    gate.accept(0, 20.0)
  with _refused("exceeds 10 x the median 20"):
    gate.check(0, 0, 500.0, True)  # 5x the old regime, 25x the recent one
  gate.accept(0, 0.0)  # an absent island's zeros carry no scale
  assert gate.history(0) == [20.0] * 8
  assert validate.NormGate().history(1) == []  # fragments are independent
  validate.NormGate(bound=0).check(0, 0, 1e30, True)  # 0: the norm check is off


def test_a_minority_liar_at_the_bound_cannot_ratchet_it_up():
  gate = validate.NormGate(bound=10, window=8)
  for _ in range(50):  # 2 honest islands at ~1, a liar at just under the bound every round
    for island, norm in ((0, 1.0), (1, 1.2), (2, 9.9 * (gate.median(0) or 1.0))):
      gate.check(island, 0, norm, True)
      gate.accept(0, norm)
  assert gate.median(0) <= 1.2
  with _refused("^island 2: fragment 0 payload norm"):
    gate.check(2, 0, 13.0, True)


def test_the_gate_round_trips_through_json_and_takes_the_config():
  gate = _gate_with_history([1.0, 2.0, 3.0], window=4)
  gate.accept(3, 7.0)
  saved = json.loads(json.dumps(gate.to_json()))
  again = validate.NormGate.from_json(saved)
  assert again.to_json() == gate.to_json() and again.median(0) == 2.0
  cut = validate.NormGate.from_json(saved, bound=3.0, window=2)  # the config changed
  assert (cut.bound, cut.history(0)) == (3.0, [2.0, 3.0])
  with _refused("exceeds 3 x the median 2.5"):
    cut.check(1, 0, 8.0, True)
  assert validate.NormGate.from_json(None).to_json()["norms"] == {}
  c = config_lib.base_config()
  assert (c.launch.norm_bound, c.launch.norm_window) == (10.0, 8)
  assert (validate.NormGate.from_config(c).bound, validate.NormGate.from_config(c).window) == (
      10.0, 8)
  for bound, window in ((0.5, 8), (1.0, 8), (math.nan, 8), (math.inf, 8), (10, 0)):
    with pytest.raises(ValueError, match=r"launch\.norm_(bound|window)="):
      validate.NormGate(bound, window)


def test_config_validate_refuses_a_bad_norm_bound():
  c = config_lib.base_config()
  config_lib.validate(c)
  c.launch.norm_bound = 0.0  # off
  config_lib.validate(c)
  for value in (1.0, -2.0, math.nan):
    c.launch.norm_bound = value
    with pytest.raises(ValueError, match=r"^launch\.norm_bound=.* must be 0 \(off\) or > 1"):
      config_lib.validate(c)
