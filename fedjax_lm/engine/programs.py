"""The jitted programs of mesh-axis islands: each stage of :mod:`fedjax_lm.engine.stages` jitted
with shardings derived from the typed state (``Spec.shardings``), donating the state part it
updates. One program per (stage, fragment), in a registry that HLO checks walk:

    inner          islands, batch             -> islands, metrics  (donates islands)
    encode/p       islands, server, done, who -> islands, sent     (donates islands)
    receive/p      server, sent               -> server            (donates server)
    merge/p        islands, server            -> islands           (donates islands)
    late/p         islands, server            -> islands, server   (outer.delay only; donates
                                                                    both)

``receive/p`` is ``outer_step(server, reduce(sent))``: the two stages stay separate functions
(so a syncer can run the outer step apart from the islands) but run as one program here, where
XLA fuses the mean's rescaling into the outer update. Measured: as two programs the losses
after the first sync moved by 1 ulp (1e-7 relative); as one they are bit for bit those of the
engine before the stages were split (``tests/test_golden.py``), and one dispatch fewer.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_lm import cpu
from fedjax_lm import mesh as mesh_lib
from fedjax_lm.engine import stages


@dataclasses.dataclass(frozen=True)
class Programs:
  init: Callable  # global params -> State
  inner: Callable
  encode: tuple[Callable, ...]  # per fragment
  receive: tuple[Callable, ...]
  merge: tuple[Callable, ...]
  late: tuple[Callable, ...] = ()  # outer.delay: the outer step one round late (else empty)
  current: Callable | None = None  # outer.delay: server -> params with the held means applied

  def registry(self) -> dict[str, Callable]:
    """``{"inner": ..., "encode/0": ..., "receive/0": ..., ...}``."""
    out = {"inner": self.inner}
    for name in ("encode", "receive", "merge", "late"):
      out.update({f"{name}/{p}": fn for p, fn in enumerate(getattr(self, name))})
    return out


def metric_shardings(mesh) -> dict:
  per_island = NamedSharding(mesh, P("island"))
  return {"island_loss": per_island, "island_ok": per_island}


def build(spec: stages.Spec, link: Any) -> Programs:
  sh = spec.shardings
  batch = NamedSharding(spec.mesh, mesh_lib.batch_spec())
  jit = lambda fn, p, **kw: jax.jit(functools.partial(fn, spec, p), **kw)
  frags = range(spec.frags.num)
  return Programs(
      init=jax.jit(functools.partial(stages.init, spec), out_shardings=sh),
      inner=cpu.jit_step(functools.partial(stages.inner_step, spec), spec.mesh,
                         in_shardings=(sh.islands, batch),
                         out_shardings=(sh.islands, metric_shardings(spec.mesh)),
                         donate_argnums=0),
      encode=tuple(jit(stages.encode, p, in_shardings=(sh.islands, sh.server, None, None),
                       out_shardings=(sh.islands, spec.sent_shardings(p, "island")),
                       donate_argnums=0) for p in frags),
      receive=tuple(getattr(link, "receive_program", functools.partial(fused_receive, link))(
          spec, p) for p in frags),
      merge=tuple(jit(stages.merge, p, in_shardings=(sh.islands, sh.server),
                      out_shardings=sh.islands, donate_argnums=0) for p in frags),
      late=tuple(jit(stages.late_merge, p, in_shardings=(sh.islands, sh.server),
                     out_shardings=(sh.islands, sh.server), donate_argnums=(0, 1))
                 for p in frags) if spec.merge.delayed else (),
      current=jax.jit(functools.partial(stages.current_params, spec),
                      in_shardings=(sh.server,), out_shardings=sh.server.params)
      if spec.merge.has_current else None)


def fused_receive(link: Any, spec: stages.Spec, p: int) -> Callable:
  """``receive/p`` of a link that delivers every island's payload (XLA, host): reduce and
  outer step in one program. A link that delivers something else (the decoupled island's
  remote link: the syncer's mean) gives its own ``receive_program(spec, p)``."""
  return jax.jit(functools.partial(receive, spec, p, link),
                 in_shardings=(spec.shardings.server, spec.sent_shardings(p, link.lead)),
                 out_shardings=spec.shardings.server, donate_argnums=0)


def receive(spec: stages.Spec, p: int, link: Any, server: Any, sent: tuple) -> Any:
  """RECEIVE: the mean of what the islands sent (the link's collective), then the outer step
  (a delayed merge policy holds the mean for the next send's :func:`stages.late_merge`)."""
  return stages.receive(spec, p, server, stages.reduce(spec, p, link, sent))


def lower_sync(programs: Programs, spec: stages.Spec, link: Any, state: Any, p: int) -> dict:
  """Lowered ``encode/p``, ``receive/p`` and ``merge/p`` on (abstract) ``state``, for HLO
  checks."""
  done, who = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((spec.num,), jnp.bool_)
  _, sent = jax.eval_shape(programs.encode[p], state.islands, state.server, done, who)
  sent = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sent,
                      spec.sent_shardings(p, link.lead))
  out = {"encode": programs.encode[p].lower(state.islands, state.server, done, who),
         "receive": programs.receive[p].lower(state.server, sent),
         "merge": programs.merge[p].lower(state.islands, state.server)}
  if programs.late:
    out["late"] = programs.late[p].lower(state.islands, state.server)
  return out
