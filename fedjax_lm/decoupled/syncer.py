"""The syncer: owns the global params and the per-fragment outer states of decoupled islands.

Islands are independent jobs (:mod:`fedjax_lm.decoupled.island`); each encodes its own
pseudo-gradient (codec, error feedback) exactly as in the mesh-axis mode and sends it here. For
fragment p, the contributions sent after step s form round (p, s). Policy ``sync``: the round
closes when every live island has sent, or, with ``outer.quorum`` = Q > 0, when Q have and
``outer.round_timeout_seconds`` passed since the first arrived. Closing runs the reduce and
outer-step stages of :mod:`fedjax_lm.engine.stages` on this process's device: the mean of the
decoded payloads over the islands that sent (``outer.merge=tokens``: weighted by the tokens each
island processed, :mod:`fedjax_lm.decoupled.tokens`), then the fragment's outer optax step. A send that
arrives after its round closed is carried into the fragment's next round (its sender gets the
current global fragment at once). With every island present this is DiLoCo / Streaming DiLoCo.

Policy ``async`` (Async Local-SGD, Liu et al. 2024): each send is applied on arrival through
Delayed Nesterov (:mod:`fedjax_lm.outer.delayed`: lr / N per arrival, the momentum once per N);
the island then pulls the new global and the H it is to run next (dynamic local updates,
:func:`dynamic_local_steps`, from the compute seconds per step it heartbeats). Each update's
staleness (updates applied since its sender pulled) goes to ``updates.jsonl``. The run ends
when the islands' applied inner steps reach ``islands.num x total_steps`` (the synchronous
run's tokens): the final eval is written and later sends are not applied (the island stops).

Membership: an island joins (its config fingerprint and param shapes must match, or it is
refused with one line naming the difference), heartbeats, and is dropped when no heartbeat came
for ``launch.heartbeat_seconds``. Until it first joins, an island is expected (the first
``islands.num`` from the start, a ``launch.join`` island once the run is that far): rounds wait
for it for ``launch.join_grace_seconds``, so a slow starter does not find the run gone ahead.
A restarted island pulls the current global params and its
data position from here (live recovery) and joins at the next round.

Data rule under churn: island k always reads data partition k of ``islands.max_num`` (default
``islands.num``). A token counts as seen when the round holding the pseudo-gradient that consumed
it closes; the syncer records each island's data position at its accepted sends, and a restarted
island resumes from it, so no token is skipped and none enters the global model twice.

Sharded (``launch.syncer_shards`` = S, policy sync): S syncer processes, shard s owning the
fragments p % S == s (:func:`owned_fragments`): their rounds, params and outer states
(:class:`Owned`: the S shards together hold the global state once), checkpoint
(:func:`shard_workdir`) and restart (fault role ``syncer/<s>``). Islands send each fragment to
its shard and join every shard. Shard 0, the lead, evaluates the whole model: a shard s > 0
keeps its fragments as each eval step left them until the lead fetched them (``Fragments``,
signed as ``syncer/0``); one that restarted past that step sends its current ones and the eval
record names it (``inexact_shards``).

State (global params, outer states, round counters, membership, data positions, byte counts)
is checkpointed with orbax when a round closes (every ``launch.syncer_checkpoint_every``
rounds, default 1), before anyone sees the result; a restarted
syncer resumes from it and islands resend what it had not yet applied. Async: every
``launch.syncer_checkpoint_every`` updates (0 = ``islands.num``, one a round's worth) and at the
end; a restarted syncer loses at most that many updates less one (the tokens they held count as
read, not applied), instead of blocking every island's send on a save.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import functools
import json
import logging
import os
import threading
import time
import weakref
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lm import checkpoint as ckpt_lib
from fedjax_lm import data as data_lib
from fedjax_lm import engine
from fedjax_lm import faults
from fedjax_lm import health
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import metrics as metrics_lib
from fedjax_lm import model as model_lib
from fedjax_lm import outer
from fedjax_lm import train as train_lib
from fedjax_lm import wire
from fedjax_lm.decoupled import channel
from fedjax_lm.decoupled import region as region_lib
from fedjax_lm.decoupled import remote
from fedjax_lm.decoupled import tokens
from fedjax_lm.decoupled import validate
from fedjax_lm.engine import links
from fedjax_lm.engine import stages
from fedjax_lm.outer import delayed
from fedjax_lm.outer import heloco

POLICIES = ("sync", "async")


def island_config(config):
  """The config one island job builds its engine from: M = 1, island axis 1, the in-island
  axes as configured; drop-out is the run's clock's (:meth:`Clock.from_config` ``member``)."""
  c = copy.deepcopy(config)
  c.islands.num = 1
  c.islands.dropout, c.islands.absent = 0.0, ""
  c.mesh.island = 1
  return c


def single_island_config(config):
  """The syncer's engine config: an island's, with the outer step applied when a round
  closes (``outer.delay`` is the islands' own: each applies the mean one round late, while
  the syncer's copy, what evaluation reads, applies the rounds' means in order either way)."""
  c = island_config(config)
  c.outer.delay = "none"
  return c


# Config fields that may differ between the roles of one run: where each role runs and what it
# is told to do there. Everything else in the schema must match (a new field is compared by
# default).
PER_ROLE = ("launch.", "faults.", "mesh.", "data.data_dir", "log_every", "checkpoint_every",
            "keep_checkpoints")


def fingerprint(config, abstract_params) -> dict:
  """What every island and the syncer must agree on: every config field outside ``PER_ROLE``,
  and the params' shapes and dtypes."""
  shapes = {jax.tree_util.keystr(k): [list(v.shape), str(v.dtype)]
            for k, v in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  fields = {k: v for k, v in _flat(config.to_dict()).items() if not k.startswith(PER_ROLE)}
  return {**fields, "params": shapes}


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def difference(mine: dict, theirs: dict) -> str | None:
  for key in sorted(set(mine) | set(theirs)):
    if mine.get(key) != theirs.get(key):
      if key == "params":
        for name in sorted(set(mine[key]) | set(theirs.get(key, {}))):
          if mine[key].get(name) != theirs.get(key, {}).get(name):
            return f"param {name}: {theirs.get(key, {}).get(name)} (syncer: {mine[key].get(name)})"
      return f"{key}={theirs.get(key)!r} (syncer: {mine.get(key)!r})"
  return None


class _Closed(NamedTuple):
  after: int  # the fragment's round closed before this one (what its mean applies on)
  arrays: list  # the round's mean leaves, count and masked (what islands receive)
  waiting: set  # the islands live at its close that have not yet received it


@dataclasses.dataclass
class _Round:
  """An open round: the running sum of the decoded contributions accepted so far (memory: one
  fragment, whatever the number of islands), and who sent."""
  first_at: float
  total: Any = None  # sum of the decoded payloads (fragment leaves, on the device)
  kept: Any = None  # codecs with a support: per coordinate, how many sending islands kept it
  count: int = 0  # contributions with weight > 0
  weight: float = 0.0  # outer.merge=tokens: the sum of their islands' merge weights
  masked: bool = False  # an island reported a non-finite pseudo-gradient (weight < 0)
  senders: dict = dataclasses.field(default_factory=dict)  # island -> data position


class Syncer:
  """The syncer service's state and methods (``join``, ``heartbeat``, ``send``, ``receive``,
  ``leave``), each a ``(who, meta, arrays) -> (kind, meta, arrays)`` handler of
  :mod:`fedjax_lm.decoupled.channel` (which authenticated ``who`` and the request)."""

  def __init__(self, config, workdir: str, secret: bytes):
    self.config, self.workdir, self.secret = config, workdir, secret
    # HALoS's tiers (region.py): a regional syncer (LPS) serves its region's islands, the
    # global one (GPS) the regions; None: a flat syncer of every island
    self.tier = region_lib.tier(config)
    self.num = int(config.islands.num)
    self.max_islands = int(config.islands.max_num) or self.num  # ids 0 .. max_islands - 1
    # the members this syncer serves and whose applied steps, over how many islands, are the
    # run's progress (async)
    self.member_ids = tuple(range(self.num))
    self.progress_over = self.num
    if self.tier is not None:
      self.member_ids, self.progress_over = self.tier.members, self.tier.islands
      self.num = len(self.member_ids)
      if self.tier.kind == "global":
        self.max_islands = self.num
    self.heartbeat_s = float(config.launch.heartbeat_seconds)
    self.quorum = int(config.outer.quorum)
    self.timeout_s = float(config.outer.round_timeout_seconds)
    self.total = int(config.total_steps)
    self.asynchronous = config.outer.policy == "async"
    self.uplink = None  # an LPS's link to the GPS (serve() starts it)
    self.finals: set[int] = set()  # the GPS: regions that sent their final push
    # a sharded syncer (launch.syncer_shards = S): this process owns fragments p % S == shard
    self.shards, self.shard = int(config.launch.syncer_shards), int(config.launch.syncer_shard)
    self.role = "syncer" if self.shards == 1 else f"syncer/{self.shard}"
    self.addresses = [a for a in str(config.launch.syncer).split(",") if a]
    self._build_programs(config)
    frags = self.owned = owned_fragments(self.spec.frags.num, self.shards, self.shard)
    self.lock = threading.Condition()
    self.rounds: dict[int, dict[int, _Round]] = {p: {} for p in frags}  # open rounds by step
    self.closed: dict[int, int] = {p: 0 for p in frags}  # last closed send step per fragment
    # per fragment: {step: the round's mean and what it applies on}, the last round (with
    # outer.delay the last two: an island asks for round r - 1 after round r may close)
    self.after_round: dict[int, dict[int, _Closed]] = {p: {} for p in frags}
    self.members: dict[int, dict] = {}  # island -> {"last": time, "live": bool}
    # Islands expected but not yet joined -> the time they are dropped if they have not: the
    # first islands.num from the start (a round must not close before a slow starter came
    # up), announced joiners once the run is that far; launch.join_grace_seconds each.
    self.join_grace_s = float(config.launch.join_grace_seconds)
    self.expected: dict[int, float] = {}
    self.data_positions: dict[str, str] = {}
    self.payload_bytes: dict[str, int] = {}  # island -> payload bytes accepted
    self.events: list[dict] = []
    # Islands announced to join once rounds closed through a step (launch.join): expected
    # from then on, and dropped like any island if they do not heartbeat in time.
    self.joins = dict(health.parse_pairs(config.launch.join, "launch.join"))
    self.version = 0  # rounds closed (async: pseudo-gradients applied)
    self.applied_steps: dict[str, int] = {}  # async: inner steps each island's updates hold
    self.step_s: dict[int, float] = {}  # async: each island's measured seconds per step
    self.evaluated = 0  # last step evaluated
    self.done = False
    self.checkpoint_every = (int(config.launch.syncer_checkpoint_every) or
                             (self.num if self.asynchronous else 1))
    self.checkpoints = 0  # saves by this process
    self.counters: dict[str, int] = {}  # island -> the counter of its last accepted send
    self.sent_positions: dict[int, str | None] = {}  # island -> its last sent data position
    self.told: dict[int, int] = {}  # async: island -> the H it was told at its last pull
    self.norms = validate.NormGate(float(config.launch.norm_bound),
                                   int(config.launch.norm_window))
    # outer.merge=tokens: island -> its tokens per round relative to the smallest island's
    # (equal islands weigh 1 each: exactly the mean); None: the mean
    tokens_per_round = tokens.weights(config)
    self.merge_weights = (None if tokens_per_round is None else
                          [t / min(tokens_per_round) for t in tokens_per_round])
    # sharded: a shard s > 0 keeps its fragments as each eval step left them until the lead
    # shard (0), which evaluates the whole model, fetched them (step -> host leaves)
    self.stashed: dict[int, list] = {}
    self.fetched = 0  # the last eval step the lead fetched from this shard
    self._peers: dict[int, channel.Client] = {}  # the lead's clients of the other shards
    self.plan = faults.Plan.from_config(config)
    path = os.path.join(workdir, "metrics.jsonl")
    self._written = _steps_written(path)  # evals written by this syncer before a restart
    self.metrics = metrics_lib.JsonlWriter(path)
    self._events = metrics_lib.JsonlWriter(os.path.join(workdir, "events.jsonl"))
    self._updates = metrics_lib.JsonlWriter(os.path.join(workdir, "updates.jsonl"))
    self.ckpt = ckpt_lib.Checkpointer(workdir, every=1, keep=2, name="syncer_checkpoints")
    self._unsaved = False
    self._state_copy: tuple[int, Any] = (-1, lambda: None)  # (version, weakref to _Views)
    # evaluation runs on its own thread on a copy of the params: rounds go on meanwhile
    self._evals = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="syncer-eval")
    self._pending_evals: list[concurrent.futures.Future] = []
    if not self._restore():
      self.expected = {k: time.time() + self.join_grace_s for k in self.member_ids}
    if tokens_per_round is not None:
      self._log("merge_weights", tokens_per_round=tokens_per_round, weights=self.merge_weights)

  def _build_programs(self, config) -> None:
    """The island's engine (M = 1, outer step on receipt) on this process's first device:
    the reduce and outer-step programs rounds run, the evaluator, the sends' layout."""
    mesh = mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 1, "tensor": 1},
                              jax.devices()[:1])
    model_cfg = model_lib.ModelConfig.from_config(config.model)
    outer_tx = None
    if self.tier is not None:  # HALoS: this tier's Delayed Nesterov
      outer_tx = self.tier.outer_tx()
    elif self.asynchronous:  # Delayed Nesterov with the configured outer lr and momentum
      hp = outer.resolved_hparams(config.outer)
      every = int(config.outer.delay_every) or self.num
      if config.outer.optimizer == "heloco":  # each stale arrival corrected first (HeLoCo)
        outer_tx = heloco.delayed_nesterov(hp["learning_rate"], hp.get("momentum", 0.0), every,
                                           **heloco.settings(config.outer))
      else:
        outer_tx = delayed.delayed_nesterov(hp["learning_rate"], hp.get("momentum", 0.0), every)
    self.engine = engine.build(single_island_config(config), mesh, model_cfg, outer_tx=outer_tx)
    self.spec, self.schedule = self.engine.spec, self.engine.clock.schedule
    graphdef, abstract = model_lib.build(model_cfg)
    self.fingerprint = fingerprint(config, abstract)
    self.job = channel.job_id(self.fingerprint)
    self.evaluate = train_lib.Evaluator(config, mesh, graphdef, self.engine.params_sharding,
                                        data_lib.get_tokenizer(config.data.tokenizer))
    frags = range(self.spec.frags.num)
    # The server part alone (the islands' params and inner state are never materialised
    # here); a shard of S > 1 keeps only the fragments it owns (:class:`Owned`), so the S
    # shards together hold one copy of the params and outer state, not S.
    owned = owned_fragments(self.spec.frags.num, self.shards, self.shard)
    self.server_spec = self.spec if self.shards == 1 else dataclasses.replace(
        self.spec, frags=Owned(self.spec.frags, owned))
    shardings = self.engine.state_shardings.server if self.shards == 1 else None

    def init(params):
      server = stages.init(self.spec, params).server
      if self.shards == 1:
        return server
      return server._replace(
          params=tuple(self.spec.frags.take(server.params, p) for p in owned),
          outer=tuple(server.outer[p] if p in owned else self.spec.outer_tx.init(())
                      for p in frags))
    # (a single syncer's params become the server's in place; a shard's are sliced, then freed)
    self.server = jax.jit(init, out_shardings=shardings,
                          donate_argnums=0 if self.shards == 1 else ())(
        _params_leaf_by_leaf(self.engine.make_params, jax.random.key(int(config.seed))))
    one = dataclasses.replace(self.spec, num=1)
    # A send is measured first (norm, finite: no payload-sized output), then, if the gate
    # admits it, decoded straight into the round's running sum (donated): no decoded copy
    # beside the sum and the received buffer. The round's mean is computed in the sum's place.
    weighted = tokens.weights(config) is not None  # outer.merge=tokens
    self._gauge = [jax.jit(functools.partial(gauge, one, p)) for p in frags]
    self._first = [jax.jit(functools.partial(summand, one, p, weighted)) for p in frags]
    self._add = [jax.jit(functools.partial(add_in, one, p, weighted), donate_argnums=(0, 1))
                 for p in frags]
    self._mean = jax.jit(finish, donate_argnums=0)
    self._outer = [jax.jit(functools.partial(stages.receive, self.server_spec, p),
                           donate_argnums=0, out_shardings=shardings)
                   for p in frags]  # the islands' own outer-step program
    # What one island sends per fragment (abstract): the layout every send is checked against.
    state = jax.eval_shape(self.engine.init, jax.random.key(0))
    self._sent = [jax.eval_shape(self.engine.programs.encode[p], state.islands, state.server,
                                 jax.ShapeDtypeStruct((), jnp.int32),
                                 jax.ShapeDtypeStruct((1,), jnp.bool_))[1] for p in frags]
    self._take = [jax.jit(lambda params, p=p: self.server_spec.frags.take(params, p))
                  for p in frags]
    # the lead's eval: the whole model from every shard's fragments
    self._put = [jax.jit(lambda params, values, p=p: self.spec.frags.put(params, p, values),
                         donate_argnums=0) for p in frags]
    self._whole = jax.jit(lambda values: functools.reduce(
        lambda tree, pv: self.spec.frags.put(tree, pv[0], pv[1]), zip(owned, values),
        jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                     jax.eval_shape(self.engine.make_params, jax.random.key(0)))))
    # compiled now, not at the first send (a round must not wait on a compile)
    w = jax.ShapeDtypeStruct((), jnp.float32)
    self._gauge = [f.lower(sent).compile() for f, sent in zip(self._gauge, self._sent)]
    self._add = [f.lower(*jax.eval_shape(first, sent, w), sent, w).compile()
                 for f, first, sent in zip(self._add, self._first, self._sent)]
    self._first = [f.lower(sent, w).compile() for f, sent in zip(self._first, self._sent)]
    self._copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))

  # ------------------------------------------------------------------ checkpoint
  def _meta(self) -> dict:
    return {"closed": {str(k): v for k, v in self.closed.items()}, "version": self.version,
            "members": sorted(self.members), "data_positions": self.data_positions,
            "payload_bytes": self.payload_bytes, "evaluated": self.evaluated,
            "applied_steps": self.applied_steps, "counters": self.counters,
            "norms": self.norms.to_json()}

  def _save(self) -> None:
    """Starts an asynchronous save of the state (orbax copies it off the device before it
    returns, then writes on its own thread): the round's lock is not held while it writes.
    :meth:`_durable` waits for it before a round's result is delivered."""
    self.ckpt.save(self.version, self.server, None, force=True, clock=self._meta())
    self._unsaved = True
    self.checkpoints += 1
    with open(os.path.join(self.workdir, "progress.json"), "w", encoding="utf-8") as f:
      json.dump({"closed_through": min(self.closed.values()), "version": self.version,
                 "checkpoints": self.checkpoints}, f)

  def _durable(self) -> None:
    """Waits (without the lock) until the last save is on disk: a round's mean or state is
    delivered only once a restarted syncer would resume with it (nothing applied twice)."""
    if self._unsaved:
      self.ckpt.wait()
      self._unsaved = False

  def _restore(self) -> bool:
    abstract = ckpt_lib.abstract_like(self.server, (
        self.engine.state_shardings.server if self.shards == 1 else
        jax.tree.map(lambda x: x.sharding, self.server)))
    step, server = self.ckpt.restore_latest(abstract, None, layout={})
    if step is None:
      return False
    self.server, meta = server, self.ckpt.json(step, "clock")
    self.closed = {int(k): v for k, v in meta["closed"].items()}
    self.version, self.evaluated = meta["version"], meta["evaluated"]
    self.data_positions, self.payload_bytes = meta["data_positions"], meta["payload_bytes"]
    self.applied_steps = meta.get("applied_steps", {})
    self.counters = meta.get("counters", {})
    if "norms" in meta:
      self.norms = validate.NormGate.from_json(meta["norms"],
                                               float(self.config.launch.norm_bound),
                                               int(self.config.launch.norm_window))
    # The islands reconnect (and resend what the checkpoint lacks) while this process comes
    # up: three heartbeat periods of grace, so that a restart with a
    # short heartbeat does not drop them and close rounds without them.
    grace = time.time() + 2 * self.heartbeat_s
    self.members = {int(k): {"last": grace, "live": True} for k in meta["members"]}
    self._log("syncer_restored", version=self.version, closed=self.closed)
    if not self.asynchronous:  # an eval step the saved round completed (saved before its eval)
      self._maybe_evaluate()
    return True

  def _log(self, kind: str, **fields) -> None:
    record = {"event": kind, "time": time.time(), **fields}
    self.events.append(record)
    logging.warning("syncer: %s", json.dumps(record))
    self._events.write(record)

  # ------------------------------------------------------------------ membership
  def _live(self) -> set[int]:
    now = time.time()
    for k, step in list(self.joins.items()):
      if min(self.closed.values()) >= step:
        del self.joins[k]
        if k not in self.members:
          self.expected[k] = now + self.join_grace_s
          self._log("island_expected", island=k, step=min(self.closed.values()))
    for k, deadline in list(self.expected.items()):
      if now > deadline:
        del self.expected[k]
        self._log("island_left", island=k,
                  reason=f"did not join within {self.join_grace_s:.0f} s")
    for k, m in self.members.items():
      if m["live"] and now - m["last"] > self.heartbeat_s:
        m["live"] = False
        self._log("island_left", island=k, reason=f"no heartbeat for {self.heartbeat_s:.0f} s")
    return {k for k, m in self.members.items() if m["live"]} | set(self.expected)

  def _island(self, who: str, meta: dict) -> int:
    """The caller's island: its key's identity; a body naming another island is refused."""
    prefix, _, k = who.partition("/")
    member = self.tier.prefix if self.tier is not None else "island"
    if prefix != member:
      raise validate.Refusal(f"{who} is not a member here (a {member})")
    island = int(k)
    if "island" in meta and validate.island_id(meta["island"], self.max_islands) != island:
      raise validate.Refusal(f"{member} {island} signs as {member} {meta['island']!r}")
    if self.tier is not None and island not in self.member_ids:
      raise validate.Refusal(f"{who} is not in this syncer's region {self.tier.region}")
    return island

  def join(self, who: str, meta: dict, arrays: list) -> channel.Reply:
    del arrays
    island = self._island(who, meta)
    why = difference(self.fingerprint, meta.get("fingerprint", {}))
    if why is not None:
      raise channel.Refused(f"island {island} refused: {why}")
    with self.lock:
      rejoin = island in self.members
      self.expected.pop(island, None)
      self.members[island] = {"last": time.time(), "live": True}
      start = min(self.closed.values()) if any(self.closed.values()) else 0
      if self.asynchronous:
        start = self.applied_steps.get(str(island), 0)
      self._log("island_rejoined" if rejoin else "island_joined", island=island, step=start)
      arrays = self._state_arrays()
      position = self.data_positions.get(str(island), "")
      self.told.pop(island, None)
      self.sent_positions[island] = position or None
    return "joined", {"step": start, "data": position, "version": self.version,
                      "closed": self.closed, "progress": self.progress()}, arrays

  def state_bytes(self) -> int:
    """The largest reply a member takes from here: the server state, and a header."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.server)) + 4096

  def _state_arrays(self) -> list:
    """The server parts a joiner or a lagging island adopts (:func:`remote.transferable`; a
    shard: its own fragments', :func:`remote.fragment_parts`): a device copy nothing donates,
    sent from zero-copy host views (no host copy is cached on the live server arrays). Every
    reply at one version shares one copy (M islands joining at once hold one, not M); it is
    freed once the last of them has been sent (lock held)."""
    version, ref = self._state_copy
    views = ref() if version == self.version else None
    if views is None:
      if self.shards > 1:
        parts = remote.fragment_parts(self.server_spec, self.server, self.owned)
      else:
        parts = remote.transferable(self.spec, self.server, self.asynchronous)
      views = _Views(remote.host_view(x) for x in jax.tree.leaves(self._copy(parts)))
      self._state_copy = (self.version, weakref.ref(views))
    return views

  def heartbeat(self, who: str, meta: dict, arrays: list) -> channel.Reply:
    """Marks the island alive. The timestamp is taken without the lock, so a syncer busy
    closing a round (compiling, evaluating, checkpointing) does not make islands look dead."""
    del arrays
    island = self._island(who, meta)
    m = self.members.get(island)
    if m is not None:
      m["last"] = time.time()
    if meta.get("step_s"):
      try:
        self.step_s[island] = validate.step_s(meta["step_s"], island, self.step_s)
      except validate.Refusal as e:  # unknown speed: everyone runs H (fails safe)
        self.step_s.pop(island, None)
        self._log("step_s_refused", island=island, reason=str(e))
    if m is not None and not m["live"]:
      with self.lock:
        m["live"] = True
        self._log("island_back", island=island)
        self.lock.notify_all()
    return "ok", {}, []

  def leave(self, who: str, meta: dict, arrays: list) -> channel.Reply:
    del arrays
    island = self._island(who, meta)
    with self.lock:
      if island in self.members:
        del self.members[island]
        self._log("island_finished", island=island)
      if self.tier is not None and self.tier.kind == "global":  # the region flushed first
        self.finals.add(island)
        self._maybe_evaluate()
      self.lock.notify_all()
    return "ok", {}, []

  # ------------------------------------------------------------------ rounds
  def _check_payload(self, p: int, arrays: list) -> None:
    """The payload's leaves as this run's encode lays them out, then the weight ``[1, 1]``
    (one copy: islands of any device count send one)."""
    expected = jax.tree.leaves(self._sent[p])
    expected[-1] = jax.ShapeDtypeStruct((1, 1), expected[-1].dtype)
    if len(arrays) != len(expected):
      raise wire.WireError(f"fragment {p}: {len(arrays)} arrays, expected {len(expected)}")
    for a, e in zip(arrays, expected):
      if a.shape != tuple(e.shape) or a.dtype != e.dtype:
        raise wire.WireError(f"fragment {p}: array {a.dtype}{list(a.shape)}, expected "
                             f"{e.dtype}{list(e.shape)}")

  def _check_send(self, island: int, meta: dict, arrays: list) -> tuple[int, int, float]:
    """(fragment, step, weight) of a send, every field validated before anything is kept:
    the fragment and step on this run's schedule, the layout, the weight one of 1 (sent),
    0 (absent) or -1 (non-finite, masked), a counter above the island's last, the data
    position well formed."""
    p, step = self._fragment_step(island, meta)
    self._check_payload(p, arrays)
    weight = float(arrays[-1].reshape(-1)[0])
    if weight not in (1.0, 0.0, -1.0) or np.any(arrays[-1] != weight):
      raise validate.Refusal(f"island {island}: send weight {weight!r} (1, 0 or -1)")
    counter = meta.get("counter")
    if type(counter) is not int or counter <= self.counters.get(str(island), -1):  # pylint: disable=unidiomatic-typecheck
      raise validate.Refusal(f"island {island}: send counter {counter!r} is not above its last "
                             f"({self.counters.get(str(island))}): a replay")
    if meta.get("data", ""):
      validate.data_position(meta["data"], island, self.sent_positions.get(island))
    return p, step, weight

  def _fragment_step(self, island: int, meta: dict) -> tuple[int, int]:
    """(fragment, step) a send or receive names: on this run's schedule, and (sharded) a
    fragment this shard owns."""
    p, step = validate.send_step(meta.get("step"), meta.get("fragment"), self.spec.frags.num,
                                 self.total, None if self.asynchronous else self.schedule.sends,
                                 island=island)
    if p not in self.closed:
      raise validate.Refusal(f"island {island}: fragment {p} belongs to syncer shard "
                             f"{p % self.shards}, not {self.shard}")
    return p, step

  def send(self, who: str, meta: dict, arrays: list) -> channel.Reply:
    island = self._island(who, meta)
    p, step, weight = self._check_send(island, meta, arrays)
    # measured on the device, outside the lock (the norm gate decides under it)
    sent = self._one(p, arrays[:-1], weight)
    one = self._gauge[p](sent)
    norm, finite = float(one.norm), bool(one.finite)
    with self.lock:
      if island not in self.members:
        raise channel.Refused(f"island {island} has not joined")
      self.members[island]["last"] = time.time()
      self.counters[str(island)] = meta["counter"]
      if meta.get("data", ""):
        self.sent_positions[island] = meta["data"]
      if self.asynchronous:
        if self.done:  # the run's tokens are in and evaluated: not applied, the island stops
          return "ok", {"late": True, "stop": True}, []
        self._apply_async(island, p, meta, sent, one, norm, finite, arrays)
        return "ok", {"late": False, "stop": self.done}, []
      late = step <= self.closed[p]
      key = min((s for s in self.rounds[p] if s > step), default=None) if late else step
      if late and key is None:
        key = self.closed[p] + self.schedule.every  # the fragment's next round
      if key > self.total:
        self._log("late_send_dropped", island=island, fragment=p, step=step)
        return "ok", {"late": True}, []
      rnd = self.rounds[p].setdefault(key, _Round(time.time()))
      if island in rnd.senders:  # one contribution per island and round, late or not
        self._log("duplicate_send", island=island, fragment=p, step=step, round=key)
        return "ok", {"late": late, "duplicate": True}, []
      refused = self._gate(island, p, step, one, norm, finite)
      if refused:  # heard from (the round need not wait for it), nothing of it summed
        rnd.senders[island] = ""
        self.plan.maybe_kill(self.role, self.version, self.workdir)
        self._maybe_close(p)
        return "ok", {"late": late, "refused": refused}, []
      self._add_to(rnd, p, sent, one, island, meta.get("data", ""), arrays)
      if late:
        self._log("late_send", island=island, fragment=p, step=step, carried_to=key)
      self.plan.maybe_kill(self.role, self.version, self.workdir)
      self._maybe_close(p)
    return "ok", {"late": late}, []

  def _gate(self, island: int, p: int, step: int, one: "Gauge", norm: float,
            finite: bool) -> str:
    """Why a sent payload may not enter the sum (not finite, or its norm far above the recent
    median: :class:`validate.NormGate`), logged; "" if it may (and its norm is recorded)."""
    if not one.count > 0:
      return ""
    try:
      self.norms.check(island, p, norm, finite)
    except validate.Refusal as e:
      self._log("payload_refused", island=island, fragment=p, step=step, reason=str(e))
      return str(e)
    self.norms.accept(p, norm)
    return ""

  def _one(self, p: int, arrays: list, weight: float) -> tuple:
    """One island's payload leaves and weight as the mesh-axis reduce takes them (M = 1)."""
    leaves = [jax.device_put(a) for a in arrays]  # (a CPU device takes the aligned buffer in place)
    payload = (tuple(leaves) if self.spec.codec is None else
               jax.tree.unflatten(jax.tree.structure(self._sent[p][0]), leaves))
    return payload, jnp.full((1, self.spec.devices_per_island), weight, jnp.float32)

  def _add_to(self, rnd: _Round, p: int, sent: tuple, one: "Gauge", island: int,
              position: str, arrays: list) -> None:
    """Decodes an accepted send into its round's running sum (arrival order; the first one
    is the sum) and records its data position and payload bytes (none for an absent island:
    as in the mesh-axis accounting, its zeros still travel here, the round must hear from it)."""
    w = 1.0
    if self.merge_weights is not None and one.count > 0:  # outer.merge=tokens
      w = self.merge_weights[island]
      rnd.weight += w
    if rnd.total is None:
      rnd.total, rnd.kept = self._first[p](sent, np.float32(w))
    else:
      rnd.total, rnd.kept = self._add[p](rnd.total, rnd.kept, sent, np.float32(w))
    rnd.count += int(one.count)
    rnd.masked |= bool(one.masked)
    rnd.senders[island] = position
    self.payload_bytes[str(island)] = (self.payload_bytes.get(str(island), 0) +
                                       sum(a.nbytes for a in arrays[:-1]) * int(one.count > 0))

  def receive(self, who: str, meta: dict, arrays: list) -> channel.Reply:
    """Long poll: the global fragment as round (p, step) left it (the current one if that
    round is older than the last two); "pending" after a few
    seconds (the island asks again); "resend" if the syncer holds no contribution of the island
    for an open round (it restarted from a checkpoint that predates it)."""
    del arrays
    island = self._island(who, meta)
    p, step = self._fragment_step(island, meta)
    deadline = time.time() + 5.0
    if self.asynchronous:
      with self.lock:
        values = [np.asarray(jax.device_get(x)) for x in self._take[p](self.server.params)]
        self.told[island] = self._local_steps(island)
        return "global", {"version": self.version, "stop": self.done,
                          "progress": self.progress(), "local_steps": self.told[island]}, values
    with self.lock:
      while self.closed[p] < step:
        rnd = self.rounds[p].get(step)
        if rnd is None or island not in rnd.senders:
          return "resend", {}, []
        if time.time() > deadline:
          return "pending", {}, []
        self._maybe_close(p)
        self.lock.wait(0.05)
      kept = self.after_round[p].get(step)
      if kept is not None and kept.after == meta.get("applied", -1):
        reply = remote.MEAN, {"version": self.version, "round": step,
                              "after": kept.after}, kept.arrays
        kept.waiting.discard(island)
        if not kept.waiting:  # freed once sent (the reply's views keep it alive till then)
          del self.after_round[p][step]
      else:
        self._log("state_sent", island=island, fragment=p, step=step,
                  applied=meta.get("applied"), closed=self.closed[p])
        reply = remote.STATE, {"version": self.version, "closed": dict(self.closed)}, \
            self._state_arrays()
    self._durable()
    return reply

  def _maybe_close(self, p: int) -> None:
    """Closes fragment p's oldest open round if the policy says so (lock held)."""
    if not self.rounds[p]:
      return
    step = min(self.rounds[p])
    rnd = self.rounds[p][step]
    senders = set(rnd.senders)
    live = self._live()
    everyone = live <= senders
    quorum = (self.quorum > 0 and len(senders) >= self.quorum and
              time.time() - rnd.first_at >= self.timeout_s)
    if not (everyone or quorum):
      return
    self._close(p, step, rnd, live - senders, "every live island sent" if everyone else
                f"quorum {self.quorum} after {self.timeout_s:.0f} s")

  def _close(self, p: int, step: int, rnd: _Round, missing: set[int], rule: str) -> None:
    """The round's mean (its running sum over the islands that sent), the same outer-step
    program the islands run on it, and the mean kept for the islands' receives until every
    island live at the close has had it (at most the last two rounds: with ``outer.delay`` an
    island asks for round r - 1 after round r may close; one asking later adopts the state)."""
    reduced = self._mean(rnd.total, rnd.kept, np.float32(rnd.count), np.bool_(rnd.masked),
                         np.float32(rnd.count if self.merge_weights is None else rnd.weight))
    self.server = self._outer[p](self.server, reduced)
    kept = self.after_round[p]
    kept[step] = _Closed(self.closed[p], [remote.host_view(x) for x in (
        *reduced.mean, reduced.count, reduced.masked)], set(rnd.senders) | missing)
    for old in sorted(kept)[:-2 if self.spec.merge.delayed else -1]:
      del kept[old]
    del self.rounds[p][step]
    self.data_positions.update({str(k): v for k, v in rnd.senders.items() if v})
    self.closed[p] = step
    self.version += 1
    if missing:
      self._log("round_closed_without", fragment=p, step=step, missing=sorted(missing),
                rule=rule)
    if self.version % self.checkpoint_every == 0 or self._next_send(p) > self.total:
      self._save()
    self._maybe_evaluate()
    self.lock.notify_all()

  def _apply_async(self, island: int, p: int, meta: dict, sent: tuple, one: "Gauge",
                   norm: float, finite: bool, arrays: list) -> None:
    """Async: one island's pseudo-gradient, applied on arrival (Delayed Nesterov); its
    staleness is the number of updates applied since the island pulled the params it used."""
    if "version" not in meta or "local_steps" not in meta:
      raise wire.WireError(f"island {island}: an async send needs the version its params were "
                           "pulled at and its local_steps")
    pulled = int(meta["version"])
    if self.tier is not None and self.tier.kind == "global":
      # a region's push: the inner steps its islands applied since its last push, at most
      # its whole share of the run's (M / R islands x (total_steps + one phase each))
      per = self.tier.islands // self.num
      local_steps = validate.local_steps(meta["local_steps"], island,
                                         per * (self.total + int(self.schedule.every)))
    else:
      local_steps = validate.local_steps(meta["local_steps"], island,
                                         int(self.schedule.every), self.told.get(island))
    staleness = async_staleness(self.version, pulled)
    if self._gate(island, p, pulled, one, norm, finite):
      return
    rnd = _Round(time.time())
    self._add_to(rnd, p, sent, one, island, meta.get("data", ""), arrays)
    self.server = self._outer[p](self.server, self._mean(
        rnd.total, rnd.kept, np.float32(rnd.count), np.bool_(rnd.masked),
        np.float32(rnd.count)))
    self.data_positions.update({str(k): v for k, v in rnd.senders.items() if v})
    self.applied_steps[str(island)] = self.applied_steps.get(str(island), 0) + local_steps
    self.version += 1
    self._updates.write({"version": self.version, "island": island, "pulled": pulled,
                         "staleness": staleness, "local_steps": local_steps,
                         "time": time.time()})
    if self.uplink is not None:  # an LPS: every halos_k-th arrival goes on to the GPS
      self.uplink.arrived(local_steps)
    self._maybe_evaluate()
    if self.done or self.version % self.checkpoint_every == 0:
      self._save()
    self.lock.notify_all()

  def progress(self) -> int:
    """Async: the run's progress in inner steps, the islands' applied steps per island (what
    the evals are indexed by, and what each island's inner lr schedule follows)."""
    return sum(self.applied_steps.values()) // self.progress_over

  def _local_steps(self, island: int) -> int:
    """Dynamic local updates over the live islands' measured compute seconds per step."""
    h = int(self.schedule.every)
    if not self.config.outer.dynamic_local_steps:
      return h
    live = self._live() | {island}
    return dynamic_local_steps(h, {k: v for k, v in self.step_s.items() if k in live}, island,
                               live)

  def _maybe_evaluate(self) -> None:
    """Evaluates the global model at every eval step all of whose sends have closed (async:
    once the islands' applied inner steps, per island on average, reach it)."""
    if self.asynchronous:
      reached = self.progress()
      if self.tier is not None and self.tier.kind == "region":  # the GPS evaluates
        self.done |= reached >= self.total
        return
      last = self.total
      if self.tier is not None and len(self.finals) < self.num:  # the GPS: until every
        last = self.total - 1  # region flushed, the final eval waits
      for e in [s for s in range(self.evaluated + 1, min(reached, last) + 1)
                if s % int(self.config.eval_every) == 0 or s == self.total]:
        self._write_eval(e)
      if self.tier is not None and len(self.finals) == self.num and not self.done:
        self._write_eval(self.total)
      return
    # an eval step e is due once no fragment has a send in (closed, e] still open (sharded:
    # none of this shard's; the lead then fetches the others' as they left e)
    for e in [s for s in range(self.evaluated + 1, self.total + 1)
              if s % int(self.config.eval_every) == 0 or s == self.total]:
      if any(self._next_send(p) <= e for p in self.closed):
        break
      if any(self.closed[p] > e for p in self.closed):  # restored past it: not as e left it
        self.evaluated = e
        self._log("eval_skipped", step=e, closed=self.closed)
        continue
      if self.shard == 0:
        self._write_eval(e)
      else:
        self._stash(e)

  def _stash(self, e: int) -> None:
    """A shard s > 0: its fragments as eval step e left them, kept for the lead's fetch."""
    self.stashed[e] = [remote.host_view(x) for p in self.owned
                       for x in self._take[p](self.server.params)]
    self.evaluated = e
    self.done |= e == self.total

  def fragments(self, who: str, meta: dict, arrays: list) -> channel.Reply:
    """The lead shard's fetch of this shard's fragments as eval step ``meta["step"]`` left
    them (long poll); if this shard restarted past it, the current ones, marked inexact."""
    del arrays
    if who != "syncer/0" or self.shard == 0:
      raise validate.Refusal(f"{who} may not fetch fragments")
    e = meta.get("step")
    if type(e) is not int or not 0 < e <= self.total:  # pylint: disable=unidiomatic-typecheck
      raise validate.Refusal(f"fetch of eval step {e!r}")
    deadline = time.time() + 5.0
    with self.lock:
      while e not in self.stashed and self.evaluated < e:
        if time.time() > deadline:
          return "pending", {}, []
        self.lock.wait(0.05)
      exact = e in self.stashed
      values = self.stashed[e] if exact else [
          remote.host_view(x) for p in self.owned for x in self._take[p](self.server.params)]
      for old in [s for s in self.stashed if s < e]:
        del self.stashed[old]
      self.fetched = max(self.fetched, e)
      self.lock.notify_all()
      return "fragments", {"step": e, "exact": exact, "payload_bytes": self.payload_bytes}, values

  def released(self) -> bool:
    """Whether this shard may exit once done: the lead always; another once the lead fetched
    the final eval step's fragments."""
    return self.shard == 0 or self.fetched >= self.total

  def _gather(self, e: int, params: Any, record: dict) -> tuple[Any, dict]:
    """The lead shard (eval thread): the whole model at eval step e, the other shards'
    fragments fetched as e left them; their payload bytes added to the record's."""
    payload = dict(self.payload_bytes)
    for s in range(1, self.shards):
      if s not in self._peers:
        self._peers[s] = channel.Client(
            self.addresses[s], wire.derive(self.secret, "syncer/0"), "syncer/0", self.job,
            give_up_s=max(300.0, 10 * self.heartbeat_s),
            tls=channel.Tls.from_config(self.config.launch),
            bulk_min_bytes=int(self.config.launch.bulk_min_bytes))
      owned = owned_fragments(self.spec.frags.num, self.shards, s)
      limit = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) + 4096
      while True:
        kind, meta, arrays = self._peers[s].call("Fragments", "fetch", {"step": e},
                                                  reply=("fragments", "pending"),
                                                  reply_limit=limit)
        if kind == "fragments":
          break
      leaves = iter(arrays)
      for p in owned:
        like = self.spec.frag_abstract[p]
        values = tuple(next(leaves) for _ in like)
        if [tuple(v.shape) for v in values] != [tuple(x.shape) for x in like]:
          raise wire.WireError(f"syncer shard {s}: fragment {p} does not match its layout")
        params = self._put[p](params, tuple(jax.device_put(v) for v in values))
      for k, n in meta.get("payload_bytes", {}).items():
        payload[k] = payload.get(k, 0) + int(n)
      if not meta.get("exact", True):
        record["inexact_shards"] = record.get("inexact_shards", []) + [s]
    record["island_bytes"] = sum(payload.values()) / max(len(payload), 1)
    return params, record

  def _write_eval(self, e: int) -> None:
    """Schedules the eval of step e on the eval thread, on a copy of the global params taken
    now (lock held): rounds close and checkpoint meanwhile. Once the final step's is
    scheduled the run is done (nothing more is applied; the syncer exits after writing it)."""
    self.evaluated = e
    self.done |= e == self.total
    if e in self._written:  # written before this process restarted
      return
    params = (self._copy(self.server.params) if self.shards == 1 else
              self._whole(self.server.params))  # (a shard: its fragments in a whole model)
    record = {"step": e, "island_bytes": (sum(self.payload_bytes.values()) /
                                          max(len(self.payload_bytes), 1)),
              "rounds": self.version, "members": sorted(self.members)}
    self._pending_evals.append(self._evals.submit(self._evaluate_at, e, params, record))

  def _evaluate_at(self, e: int, params: Any, record: dict) -> None:
    if self.shards > 1:
      params, record = self._gather(e, params, record)
    self.metrics.write({**record, **self.evaluate(params), "time": time.time()})

  def flush(self) -> None:
    """Blocks until every scheduled eval is written (its errors raised here) and the last
    checkpoint is on disk."""
    while self._pending_evals:
      self._pending_evals.pop(0).result()
    self._durable()

  def _next_send(self, p: int) -> int:
    """The first send step of fragment p after its last closed round."""
    for s in range(self.closed[p] + 1, self.total + 1):
      if p in self.schedule.sends(s):
        return s
    return self.total + 1

  def tick(self) -> None:
    """Periodic: membership timeouts and quorum timeouts."""
    with self.lock:
      for p in self.rounds:
        self._maybe_close(p)
      self.lock.notify_all()

  def close(self) -> None:
    self.flush()
    self._evals.shutdown()
    for writer in (self.metrics, self._events, self._updates):
      writer.close()
    self.ckpt.close()

  def methods(self) -> dict:
    """The channel's methods: the request kinds each takes and the most bytes it accepts
    (a send: its fragment's layout; the rest: control messages)."""
    send_bytes = max(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(sent))
                     for sent in self._sent)
    return {"Join": channel.Method(self.join, ("join",), same_job=False),
            "Heartbeat": channel.Method(self.heartbeat, ("heartbeat",)),
            # launch.syncer_send_slots sends at a time (2: one received while another enters
            # the sum; a receive buffer each, whatever the number of islands)
            "Send": channel.Method(self.send, ("send",), lambda who: send_bytes,
                                   slots=int(self.config.launch.syncer_send_slots)),
            "Receive": channel.Method(self.receive, ("receive",)),
            "Leave": channel.Method(self.leave, ("leave",)),
            **({"Fragments": channel.Method(self.fragments, ("fetch",))} if self.shard else {})}

  def keys(self, who: str) -> bytes | None:
    """A member's key: ``island/<k>`` for k in [0, max_islands) (and, on a shard s > 0, the
    lead shard ``syncer/0``); None for anyone else."""
    if who == "syncer/0" and self.shard > 0:
      return wire.derive(self.secret, who)
    prefix, _, k = who.partition("/")
    member = self.tier.prefix if self.tier is not None else "island"
    if prefix != member or not k.isdigit() or str(int(k)) != k or int(k) >= self.max_islands:
      return None
    if self.tier is not None and int(k) not in self.member_ids:
      return None  # (an island of another region)
    return wire.derive(self.secret, who)


class Owned:
  """A syncer shard's fragments (:class:`fragments.Fragments`' interface): its params are a
  tuple of the fragments it owns (in ``owned`` order), not the whole tree; any other
  fragment is empty."""

  def __init__(self, frags, owned: tuple):
    self.num, self.members, self.owned = frags.num, frags.members, tuple(owned)
    self._index = {p: i for i, p in enumerate(self.owned)}

  def take(self, tree: Any, p: int, lead: int = 0) -> tuple:
    del lead
    return tree[self._index[p]] if p in self._index else ()

  def put(self, tree: Any, p: int, values: tuple, lead: int = 0) -> Any:
    del lead
    i = self._index[p]
    return (*tree[:i], tuple(v.astype(x.dtype) for v, x in zip(values, tree[i])),
            *tree[i + 1:])


class _Views(list):
  """Host views of one state copy (a list that a weak reference can name)."""


class Gauge(NamedTuple):
  """What the syncer checks of one island's payload before it enters a round's sum."""
  count: jax.Array  # 1 if the island sent (weight > 0), else 0
  masked: jax.Array  # the island reported a non-finite pseudo-gradient (weight < 0)
  norm: jax.Array  # the decoded payload's L2 norm
  finite: jax.Array  # every decoded value finite


def _steps_written(path: str) -> set[int]:
  """The steps of the complete records of a metrics file (none if it does not exist)."""
  steps = set()
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          steps.add(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
          pass
  return steps


def _params_leaf_by_leaf(make_params, key) -> Any:
  """``make_params(key)``, each leaf by its own program (the others' random draws pruned):
  the same values, with one leaf's PRNG temporaries at a time instead of the whole model's
  (at the 150M size the whole-model program peaks 1.65 GB for 0.6 GB of params)."""
  treedef = jax.tree.structure(jax.eval_shape(make_params, key))
  return jax.tree.unflatten(treedef, [
      jax.jit(lambda k, i=i: jax.tree.leaves(make_params(k))[i])(key)
      for i in range(treedef.num_leaves)])


def owned_fragments(num: int, shards: int, shard: int) -> tuple[int, ...]:
  """The fragments syncer shard ``shard`` of ``shards`` owns: p % shards == shard."""
  return tuple(p for p in range(num) if p % shards == shard)


def shard_workdir(workdir: str, config) -> str:
  """Where a syncer role keeps its state: the run's workdir (shard 0, the lead, which writes
  the evals), ``WORKDIR/syncer_shards/<s>`` for shard s > 0."""
  shard = int(config.launch.syncer_shard)
  return workdir if shard == 0 else os.path.join(workdir, "syncer_shards", str(shard))


def contribution(spec: stages.Spec, p: int, sent: tuple) -> tuple[tuple, Any, Gauge]:
  """The mesh-axis reduce of one island's send (M = 1): its decoded payload (zeros if it did
  not send), its support (codecs with one: per coordinate, 1 where the island kept it; else
  ``()``), and what the syncer validates."""
  reduced = stages.reduce(spec, p, links.Gathered(), sent)
  ok = reduced.count > 0
  decoded = tuple(jnp.where(ok, x, 0.0) for x in reduced.mean)
  support = getattr(spec.codec, "support", None)
  kept = ()
  if support is not None:
    flat = jax.vmap(support)(sent[0])[0].astype(jnp.float32) * ok
    kept = stages.unflatten(flat[:sum(x.size for x in decoded)], spec.frag_abstract[p])
  finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in reduced.mean]))
  # scaled by the largest |value| first: 1e30 values have a norm, not an overflow
  top = jnp.maximum(jnp.max(jnp.array([jnp.max(jnp.abs(x)) for x in decoded])),
                    jnp.finfo(jnp.float32).tiny)
  norm = top * jnp.sqrt(sum(jnp.sum(jnp.square(x / top)) for x in decoded))
  return decoded, kept, Gauge(reduced.count, reduced.masked, norm, finite)


def gauge(spec: stages.Spec, p: int, sent: tuple) -> Gauge:
  """One send's checks alone (the compiled program keeps no decoded copy)."""
  return contribution(spec, p, sent)[2]


def summand(spec: stages.Spec, p: int, weighted: bool, sent: tuple,
            weight: jax.Array) -> tuple:
  """One send's decoded payload and support as they enter a round's sum; ``weighted``
  (``outer.merge=tokens``): scaled by its island's merge weight, so the sum is
  sum_k w_k delta_k."""
  decoded, kept, _ = contribution(spec, p, sent)
  if weighted:
    decoded, kept = (tuple(x * weight for x in decoded),
                     jax.tree.map(lambda k: k * weight, kept))
  return decoded, kept


def add_in(spec: stages.Spec, p: int, weighted: bool, total: tuple, kept: Any, sent: tuple,
           weight: jax.Array) -> tuple:
  """A round's running sum (donated) plus one send's summand, in one program."""
  decoded, more = summand(spec, p, weighted, sent, weight)
  return (tuple(a + b for a, b in zip(total, decoded)),
          jax.tree.map(lambda a, b: a + b, kept, more))


def finish(total: tuple, kept: Any, count: jax.Array, masked: jax.Array,
           denominator: jax.Array) -> stages.Reduced:
  """The round's mean: the sum over the islands that sent / ``denominator`` (their number,
  as the mesh-axis reduce computes it; ``outer.merge=tokens``: the sum of their weights), with
  a support per coordinate / the islands (weights) that kept it."""
  if kept:
    mean = tuple(x / jnp.maximum(k, 1.0) for x, k in zip(total, kept))
  else:
    mean = tuple(x / jnp.maximum(denominator, 1.0) for x in total)
  return stages.Reduced(mean, count, masked)


def async_staleness(version: int, pulled: int) -> int:
  """Updates applied since an island pulled the global params at ``pulled`` (the version its
  pseudo-gradient is relative to) until its update is applied at ``version``. A pulled
  version ahead of the syncer (it restarted from a checkpoint older than that pull) counts 0."""
  if pulled < 0:
    raise wire.WireError(f"async send: pulled version {pulled} must be >= 0")
  return max(0, int(version) - int(pulled))


def dynamic_local_steps(h: int, step_s: dict, island: int, live=None) -> int:
  """Dynamic Local Updates (Liu et al. 2024, Sec. 5): island k runs
  ``floor(H * v_k / max_j v_j)`` inner steps (at least 1), v = steps per second of its own
  compute (communication excluded), the max over the live islands: the fastest keeps H, the
  others take about the same wall time per update. ``step_s``: island -> measured seconds per
  step. Until the island and every live one (``live``, default the keys of ``step_s``) have
  reported a speed, H."""
  if h < 1:
    raise ValueError(f"outer.sync_every={h} must be >= 1")
  live = set(step_s) if live is None else set(live) | {island}
  seconds = {k: float(step_s.get(k) or 0.0) for k in live}
  if any(not np.isfinite(v) or v <= 0 for v in seconds.values()):
    return h
  fastest = min(seconds.values())
  # the small tolerance keeps an exact ratio (the fastest itself: 1.0) from flooring down
  return max(1, min(h, int(np.floor(h * fastest / seconds[island] + 1e-9))))


def compilation_cache(workdir: str) -> None:
  """Every role of the run shares one persistent compilation cache (``WORKDIR/compile_cache``):
  a restarted island or syncer loads its programs instead of compiling them again."""
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "compile_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def bulk_port(port: int, offset: int) -> int:
  """The bulk path's port: the gRPC port + ``launch.bulk_port_offset`` (a firewall that opens
  fixed ports), or any free one (offset 0, or a gRPC port chosen by the system)."""
  if not offset or not port:
    return 0
  if not 0 < port + offset < 65536:
    raise ValueError(f"launch.bulk_port_offset={offset}: port {port} + {offset} is not a port")
  return port + offset


def serve(config, workdir: str) -> None:
  """Runs the syncer until every island that joined has finished the run."""
  os.makedirs(workdir, exist_ok=True)
  compilation_cache(workdir)
  secret = wire.job_secret(config.launch.secret_file)
  address = config.launch.syncer.split(",")[int(config.launch.syncer_shard)]
  tier = region_lib.tier(config)
  if tier is not None and tier.kind == "region":  # an LPS: its region's address; the GPS's
    address = region_lib.addresses(config)[tier.region]  # is launch.syncer
  host, port = address.rsplit(":", 1)
  workdir = shard_workdir(workdir, config)
  if tier is not None and tier.kind == "region":
    workdir = os.path.join(workdir, "regions", str(tier.region))
  os.makedirs(workdir, exist_ok=True)
  syncer = Syncer(config, workdir, secret)
  if tier is not None and tier.kind == "region":  # joined to the GPS before any island is
    syncer.uplink = region_lib.Uplink(config, syncer, secret)  # served
  threads = max(16, 4 * syncer.max_islands)
  server, _ = channel.serve(syncer.keys, syncer.job, config.launch.interface or host, int(port),
                            syncer.methods(), threads=threads,
                            tls=channel.Tls.from_config(config.launch),
                            bulk=int(config.launch.bulk_min_bytes) >= 0,
                            bulk_port=bulk_port(int(port), int(config.launch.bulk_port_offset)))
  logging.warning("syncer: listening on %s:%s%s", host, port, "" if server.bulk is None else
                  f" (bulk path on port {server.bulk.port})")
  try:
    while True:
      time.sleep(0.1)
      syncer.tick()
      with syncer.lock:
        if syncer.done and not syncer.members and syncer.released():
          break
    if syncer.uplink is not None:  # an LPS: what the GPS has not had, then it leaves
      syncer.uplink.flush()
  finally:
    # (the lead's fetch of this shard's final fragments marks it released before its reply has
    # been streamed: a reply in flight gets its time)
    server.stop(grace=60.0).wait(60.0)
    if syncer.uplink is not None:
      syncer.uplink.close()
    syncer.close()
