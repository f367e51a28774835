"""The island engine: DDP and mesh-axis islands behind one small API.

    eng = engine.build(config, mesh, model_cfg)          # the transformer LM, or
    eng = engine.build_for_loss(config, mesh, loss_fn=..., init_fn=..., abstract_params=...,
                                param_specs=..., inner_tx=None, outer_tx=None)   # any model
    state = eng.init(key)
    state, metrics = eng.inner_step(state, batch)        # batch [M, B, ...]
    state = eng.sync(state, done)                        # the clock's events after step done
    params = eng.eval_params(state)

Modules, in the order of the algorithm box: ``state`` (typed pytrees), ``clock`` (when things
happen, host-side), ``stages`` (inner step, encode, reduce, outer step, merge), ``links`` (the
only cross-island code), ``programs`` (the stages jitted), ``islands`` and ``ddp`` (the two
engines). ``docs/API.md`` documents the public API.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import optax
from jax.sharding import Mesh, PartitionSpec as P

from fedjax_lm import codecs
from fedjax_lm import health
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import model as model_lib
from fedjax_lm import outer
from fedjax_lm import steps
from fedjax_lm.engine import clock as clock_lib
from fedjax_lm.engine import ddp
from fedjax_lm.engine import islands as islands_lib
from fedjax_lm.engine import links
from fedjax_lm.engine.islands import IslandsEngine

ALGORITHMS = ("ddp", "islands")
TRANSPORTS = links.TRANSPORTS
check_streaming_options = islands_lib.check_streaming_options
Engine = IslandsEngine | ddp.DdpEngine


def build(config, mesh: Mesh, model_cfg: model_lib.ModelConfig,
          outer_tx: optax.GradientTransformation | None = None, **deployment) -> Engine:
  """The engine named by ``config.algorithm`` for the transformer LM on ``mesh``
  (``deployment``: a decoupled island job's ``link``, ``clock`` and ``world``)."""
  graphdef, abstract = model_lib.build(model_cfg)
  axes = model_lib.logical_axes(model_cfg)
  inner_tx = steps.inner_optimizer(config.inner, int(config.total_steps),
                                   muon_dims=steps.muon_dimensions(axes))
  return build_for_loss(
      config, mesh, loss_fn=functools.partial(steps.mean_loss, graphdef,
                                              rows=mesh_lib.activation_rows(mesh)),
      init_fn=functools.partial(model_lib.init_params, model_cfg), abstract_params=abstract,
      param_specs=mesh_lib.param_specs(axes, dict(config.rules)), outer_tx=outer_tx,
      inner_tx=inner_tx, **deployment)


def build_for_loss(config, mesh: Mesh, *, loss_fn: Callable, init_fn: Callable,
                   abstract_params: Any, param_specs: Any,
                   inner_tx: optax.GradientTransformation | None = None,
                   outer_tx: optax.GradientTransformation | None = None,
                   **deployment) -> Engine:
  """Any model: ``loss_fn(params, batch)`` is the mean loss of one island's ``[B, ...]``
  batch, ``init_fn(key)`` makes params shaped like ``abstract_params``, ``param_specs`` their
  in-island PartitionSpecs; batches are ``[M, B, ...]``. ``inner_tx`` / ``outer_tx`` replace
  the optimizers ``config.inner`` / ``config.outer`` name."""
  num = int(config.islands.num)
  if num < 1 or num % mesh.shape["island"]:
    raise ValueError(f"islands.num={num} must be a positive multiple of the mesh's island axis "
                     f"size {mesh.shape['island']} (mesh {dict(mesh.shape)})")
  if config.algorithm not in ALGORITHMS:
    raise ValueError(f"algorithm={config.algorithm!r}: expected one of {ALGORITHMS}")
  mesh_lib.check_divisible(abstract_params, param_specs, dict(mesh.shape))
  tx = inner_tx or steps.inner_optimizer(config.inner, int(config.total_steps))
  groups = mesh_lib.island_groups(num, mesh, int(config.islands.simulated_groups))
  guard = bool(config.islands.nonfinite_guard)
  make_params = jax.jit(init_fn, out_shardings=mesh_lib.shardings(mesh, param_specs))
  zero_specs = jax.tree.map(lambda s, a: mesh_lib.zero_spec(s, a.shape, mesh), param_specs,
                            abstract_params, is_leaf=lambda x: isinstance(x, P))
  if config.algorithm == "ddp":
    return ddp.build(mesh=mesh, num=num, loss_fn=loss_fn, make_params=make_params,
                     abstract=abstract_params, param_specs=param_specs, zero_specs=zero_specs,
                     tx=tx, groups=groups, guard=guard)
  return islands_lib.build(config, mesh, loss_fn=loss_fn, make_params=make_params,
                           abstract=abstract_params, param_specs=param_specs,
                           zero_specs=zero_specs, tx=tx, groups=groups, guard=guard,
                           outer_tx=outer_tx or outer.from_config(config.outer),
                           **deployment)


def _check(ok: bool, msg: str) -> None:
  if not ok:
    raise ValueError(msg)


def validate(config) -> None:
  """One clear error naming the first bad engine option (``config_lib.validate`` calls it)."""
  health.Participation(int(config.islands.num), float(config.islands.dropout),
                       config.islands.absent, 0)
  _check(config.algorithm in ALGORITHMS,
         f"algorithm={config.algorithm!r}: expected one of {ALGORITHMS}")
  _check(config.algorithm == "islands" or (not float(config.islands.dropout)
                                           and not config.islands.absent),
         "islands.dropout / islands.absent need algorithm=islands (DDP has no syncs to miss)")
  if config.algorithm == "islands":
    outer.resolved_hparams(config.outer)
    _check(int(config.outer.sync_every) >= 1,
           f"outer.sync_every={config.outer.sync_every} must be >= 1")
    clock_lib.Clock.from_config(config)
    islands_lib.check_streaming_options(config.outer, codecs.from_config(config.outer))
