"""NoLoCo (Kolehmainen et al. 2025, arXiv 2506.10911; ``outer.gossip=noloco``): no all-reduce.
Every island keeps its own outer copy ``phi_m`` and outer optimizer state; at each outer step it
averages with one random peer and takes the paper's modified Nesterov step:

    Delta_m = phi_m - theta_m                         (theta_m: its params after H inner steps)
    delta_m = a delta_m - b mean_pair(Delta) - c (phi_m - mean_pair(phi))
    phi_m  <- phi_m + delta_m ;  theta_m <- phi_m

(a: outer momentum, b: outer lr, c: ``outer.gossip_gamma``, default b as in the authors' code,
jkolehm/noloco ``sparse_optimizer_c.py``). The pair's mean replaces DiLoCo's mean over all
islands; with c = 0, or with 2 islands (whose outer copies never differ), it is DiLoCo with
heavy-ball momentum (``outer.optimizer=sgd``, which the paper calls Nesterov).

Here the outer optimizer is the configured optax transformation, fed per island with
``g_m = mean_pair(Delta) + r (phi_m - mean_pair(phi))``, r = c / b: with ``optax.sgd(b,
momentum=a)`` that is exactly the update above (the consensus term enters the momentum too).
One payload per island: ``g_m = r phi_m + mean_pair(u)`` with ``u_j = Delta_j - r phi_j``, which
island j forms from its own copy, so each island sends the peer one float32 copy of its
fragment (the authors' code sends two: phi_j and Delta_j).

Pairing: round t of fragment p pairs island m with ``m XOR d`` for a mask ``d`` in 1..M-1 drawn
from (seed, p, t) (:func:`draw`; M a power of two). The masks form a 1-factorisation of the
islands: each pair meets with probability 1 / (M - 1) per round, as under a uniform random
perfect matching (so the expected mixing matrix is the same), and the draw is one integer kept
in the state (exact resume). With M/A islands per island shard, ``m XOR d`` moves whole shards
to shard ``a XOR (d // (M/A))`` (one static ``ppermute`` per mask's shard part, picked by
``lax.switch``) and permutes rows inside the shard (``i XOR (d % (M/A))``, no traffic), so the
same pairing runs on every layout. M = 1 pairs the island with itself (DiLoCo at M = 1).

State (:class:`Copies`, in ``Server.merge`` with its island dim over ``island``): the outer
copies, their outer states and the per-fragment round counter. ``Server.params`` and
``Server.outer`` stay as initialised; evaluation reads the islands' mean outer copy
(:meth:`NoLoCo.current`, the one all-reduce, at eval only). An island that does not send
(absent, tainted or non-finite) skips its outer step and restarts from its own copy; its peer
steps with its own payload alone. ``failures_in_a_row`` is not counted (it would need an
all-reduce).

Not here: the paper's random routing of activations between pipeline stages (this engine has no
pipeline stages), compressed payloads, fragments, overlap and the decoupled deployment
(refused in ``config_lib``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_lm import health
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import outer
from fedjax_lm.engine.merges import mix

GOSSIP = ("none", "noloco")  # outer.gossip


class Copies(NamedTuple):
  """Per island (``[M, ...]``): its outer copy and, per fragment, its outer optimizer state;
  ``rounds`` (``[P]``): outer steps taken per fragment, the pairing's counter."""
  params: Any
  outer: tuple
  rounds: jax.Array  # int32


def draw(seed: int, rnd: Any, p: int, num: int) -> jax.Array:
  """Round ``rnd``'s mask d (island m's peer is ``m ^ d``): uniform in 1..M-1 (0 for M = 1).
  Traceable; on the host, ``int(draw(...))``."""
  if num == 1:
    return jnp.int32(0)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed + 3), p), rnd)
  return 1 + jax.random.randint(key, (), 0, num - 1, dtype=jnp.int32)


def gamma_ratio(oc) -> float:
  """r = gamma / outer lr (``outer.gossip_gamma``; None: gamma = the outer lr, r = 1)."""
  if oc.gossip_gamma is None:
    return 1.0
  return float(oc.gossip_gamma) / float(outer.resolved_hparams(oc)["learning_rate"])


def check_num(num: int) -> bool:
  """The XOR pairing needs M a power of two."""
  return num >= 1 and num & (num - 1) == 0


class PairLink:
  """The exchange as one ``ppermute`` over ``island`` per outer step: each island receives its
  peer's payload and weight and sends its own to the peer; nothing else crosses."""

  lead = "island"
  overlaps = False  # queued on the device: RECEIVE right after SEND

  def start(self, sent: Any, fragment: int, step: int, gathered: Any) -> Any:
    del fragment, step, gathered
    return sent

  def finish(self, handle: Any) -> Any:
    return handle

  @staticmethod
  def exchange(spec, tree: Any, shardings: Any, mask: jax.Array) -> Any:
    """``tree`` (``[M, ...]`` leaves laid out as ``shardings``) with island m's rows replaced
    by island ``m ^ mask``'s."""
    shards = spec.mesh.shape["island"]
    per = spec.num // shards  # islands per island shard (a power of two)

    def shift(b, x):  # whole shards: a -> a ^ b
      if b == 0:
        return x
      pairs = [(a, a ^ b) for a in range(shards)]
      return jax.tree.map(lambda v: jax.lax.ppermute(v, "island", pairs), x)

    def local(x, m):
      if shards > 1:
        x = jax.lax.switch(m // per, [functools.partial(shift, b) for b in range(shards)], x)
      rows = jnp.arange(per, dtype=jnp.int32) ^ (m % per)
      return jax.tree.map(lambda v: jnp.take(v, rows, axis=0), x)

    specs = jax.tree.map(lambda s: s.spec, shardings)
    return jax.shard_map(local, mesh=spec.mesh, in_specs=(specs, P()), out_specs=specs,
                         check_vma=False)(tree, mask)

  def receive_program(self, spec, p: int):
    """``receive/p``: the pair exchange and every island's outer step, one program."""
    return jax.jit(functools.partial(spec.merge.receive, spec, p),
                   in_shardings=(spec.shardings.server, spec.sent_shardings(p, "island")),
                   out_shardings=spec.shardings.server, donate_argnums=0)


class NoLoCo(mix.Mix):
  name = "noloco"
  has_current = True  # eval reads the islands' mean outer copy

  def __init__(self, gamma_ratio: float = 1.0):
    super().__init__(0.0)
    self.ratio = float(gamma_ratio)  # r = gamma / outer lr
    self.link = PairLink()

  # ------------------------------------------------------------------ state
  def state_specs(self, stacked, zero_specs, copy_outer_specs):
    del zero_specs
    return mix.Absent(), Copies(stacked, copy_outer_specs, P())

  def init(self, spec, params, stacked, outer):
    del params
    copies = jax.tree.map(lambda x: jnp.broadcast_to(x, (spec.num,) + x.shape), outer)
    return mix.Absent(), Copies(stacked, copies, jnp.zeros((spec.frags.num,), jnp.int32))

  # ------------------------------------------------------------------ hooks
  def origin(self, spec, p, server):
    """Each island's own outer copy (``[M, ...]``)."""
    return spec.frags.take(server.merge.params, p, lead=1)

  def start(self, spec, p, islands, g):
    del spec, p, islands
    return g

  def merged(self, spec, p, islands, local, new_g):
    del spec, p, islands, local
    return new_g

  def at_receive(self, spec, p, server, reduced, outer_step):
    raise NotImplementedError("NoLoCo receives through its PairLink's receive program")

  def receive(self, spec, p: int, server, sent: tuple):
    """Fragment p's exchange with the round's peer and every island's outer step."""
    delta, weight = sent
    copies = server.merge
    phi = spec.frags.take(copies.params, p, lead=1)
    r = self.ratio
    payload_sh = spec.payload_shardings(p, "island")
    u = jax.lax.with_sharding_constraint(
        tuple(d - r * f if r else d for d, f in zip(delta, phi)), payload_sh)
    weight_sh = NamedSharding(spec.mesh, P("island", mesh_lib.IN_ISLAND_AXES))
    mask = draw(spec.seed, copies.rounds[p], p, spec.num)
    u_peer, w_peer = self.link.exchange(spec, (u, weight), (payload_sh, weight_sh), mask)
    own, peer = weight[:, 0] > 0, w_peer[:, 0] > 0
    pair = health.keep_if(peer, tuple((a + b) * 0.5 for a, b in zip(u, u_peer)), u)
    g = tuple(r * f + b if r else b for f, b in zip(phi, pair))
    state = copies.outer[p]
    new_phi, new_state = jax.vmap(
        lambda d, s, x: mix.outer_update(spec.outer_tx, d, s, x))(g, state, phi)
    ok = own & jax.vmap(health.all_finite)(new_phi)
    new_phi, new_state = health.keep_if(ok, (new_phi, new_state), (phi, state))
    return server._replace(merge=Copies(
        spec.frags.put(copies.params, p, new_phi, lead=1),
        copies.outer[:p] + (new_state,) + copies.outer[p + 1:],
        copies.rounds.at[p].add(1)))

  def current(self, spec, server, outer_step, reduced_type):
    """The islands' mean outer copy (what evaluation reads)."""
    del spec, outer_step, reduced_type
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), server.merge.params)
