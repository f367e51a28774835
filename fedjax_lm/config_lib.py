"""The config schema: defaults every experiment config starts from, and validation.

Configs are ``ml_collections.ConfigDict`` s, locked after ``get_config()`` so that an override of
an unknown key (``--config.inner.lr=...``) fails naming the key. ``validate`` checks values.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os

import ml_collections
from ml_collections import config_dict

from fedjax_lm import engine
from fedjax_lm import faults
from fedjax_lm import health
from fedjax_lm import steps
from fedjax_lm.decoupled import tokens
from fedjax_lm.engine.merges import noloco
from fedjax_lm.outer import halos
from fedjax_lm.outer import heloco

PARTITIONS = ("iid", "by_play", "by_genre")


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every config; experiment configs override fields, never add them."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 25
  c.eval_every = 250
  c.eval_batch_size = 32  # rows per eval batch (global)
  c.eval_batches = 8  # at most this many eval batches
  c.checkpoint_every = 250
  c.keep_checkpoints = 2
  c.algorithm = "ddp"  # ddp | islands

  c.islands = _islands()
  c.outer = _outer()
  c.inner = _inner()
  c.data = _data()

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=512, num_layers=4, embed_dim=128, num_heads=4, num_kv_heads=4, head_dim=32,
      mlp_dim=512, max_len=256, rope_base=10_000.0, tie_embeddings=False,
      compute_dtype="float32", param_dtype="float32", scan_layers=False, attention="fused",
      attention_block=128, hand_backward=True))

  # Mesh axis sizes; one may be -1 (all remaining devices).
  c.mesh = ml_collections.ConfigDict({"island": 1, "data": -1, "fsdp": 1, "tensor": 1})
  # Logical parameter axis -> mesh axis (or None = replicated). Size-1 axes cost nothing.
  c.rules = ml_collections.ConfigDict({
      "vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor",
      "head_dim": config_dict.placeholder(str), "mlp": "tensor",
      "layers": config_dict.placeholder(str)})

  c.launch = _launch()
  c.faults = faults.config()
  return c


def _islands() -> ml_collections.ConfigDict:
  """M islands: how they run, their health, drop-out and decoupled-mode data."""
  s = ml_collections.ConfigDict()
  s.num = 1  # M
  # Island axis 1 (all M islands on each device): run them as this many concurrent vmapped
  # groups. 0 = one per core on CPU: a one-process experiments.train run emulates a CPU device
  # per core and puts the island axis over them (cpu.island_devices); a process that has
  # already started JAX runs per-core vmapped groups on its one device (mesh.island_groups).
  s.simulated_groups = 0
  # Health (fedjax_lm/health.py): skip non-finite steps, mask their islands out of the sync.
  s.nonfinite_guard = True
  s.max_nonfinite = 3  # stop after this many syncs (DDP: steps) in a row with none healthy
  s.dropout = 0.0  # probability that an island misses a send (seeded schedule)
  s.absent = ""  # explicit misses, "step:island,step:island" (sends after that step)
  s.absent_policy = "reset"  # a missing island at the merge: reset (to global) | keep
  # Decoupled mode (launch.mode=decoupled): data partitions (0 = islands.num; more lets islands
  # join later), and per-island speed factors "1,1,0.25" (emulated slower hardware).
  s.max_num = 0
  s.speed = ""
  # Decoupled mode, islands of different sizes (fedjax_lm/decoupled/tokens.py): rows per step
  # of each island "16,8" ("" = data.batch_size each) and devices of each island job "2,1"
  # ("" = as launched; the local launcher emulates that many CPU devices per island).
  s.batch_sizes = ""
  s.devices = ""
  # > 0: every inner step padded to step_seconds / speed of wall time (islands sharing a few
  # cores then run as on their own hardware); 0: compute slowed by 1 / speed.
  s.step_seconds = 0.0
  return s


def _outer() -> ml_collections.ConfigDict:
  """The outer step: optimizer, sync schedule, streaming / eager / delayed, policy, codec."""
  s = ml_collections.ConfigDict()
  # fedavg | diloco | fedopt_adam | fedopt_yogi | fedopt_adagrad | slowmo | sgd | sign_sgd |
  # heloco
  s.optimizer = "diloco"
  s.sync_every = 50  # H
  s.learning_rate = config_dict.placeholder(float)  # None: the optimizer's default
  s.momentum = config_dict.placeholder(float)
  # "" : learning_rate / momentum apply to whichever outer.optimizer runs. A name: they were
  # tuned for that optimizer; with another one (e.g. --config.outer.optimizer=fedavg on a
  # DiLoCo config) that optimizer's defaults apply instead, and the run prints a note.
  s.hparams_for = ""
  s.nesterov = False  # only for outer.optimizer=sgd
  s.clip_norm = 0.0  # > 0: clip the pseudo-gradient's global norm first
  s.reset_inner_opt_state = False
  # Streaming DiLoCo (Douillard et al. 2025) and eager updates (Kale et al. 2025).
  s.fragments = 1  # P: strided parameter fragments, staggered by H / P
  s.overlap = 0  # tau: inner steps between a fragment's send and its merge
  s.mixing = 0.0  # alpha: merge local <- alpha local + (1 - alpha) global
  s.eager = False  # ours: the eager estimate fills a tau < H overlap window
  # Kale et al. 2025: the outer step one round late, so the exchange overlaps a whole inner
  # phase. none | naive (the delayed mean) | eager (own fresh share + others' delayed)
  s.delay = "none"
  # xla: the exchange is a collective in its own program (serialised with the inner steps on
  # one device queue); host: a background thread exchanges while the device computes.
  s.transport = "xla"
  # Decoupled mode: how the syncer closes a round. sync: when every live island has sent, or
  # (quorum > 0) when that many have and round_timeout_seconds passed since the first.
  s.policy = "sync"
  s.quorum = 0
  # How a round's pseudo-gradients merge: mean (DiLoCo) | tokens (each weighted by the tokens
  # its island processed: Decoupled DiLoCo; policy sync; the same mean for equal islands)
  s.merge = "mean"
  s.round_timeout_seconds = 0.0
  # async (Liu et al. 2024): each pseudo-gradient applied on arrival through Delayed Nesterov
  # (momentum once per delay_every arrivals; 0 = islands.num), each island's H scaled to its
  # measured speed (dynamic local updates).
  s.delay_every = 0
  s.dynamic_local_steps = True
  # What crosses islands: none (float32 all-reduce) | bf16 | int8 | int4 | topk | demo
  s.compression = "none"
  s.quant_block = 256  # values per scale (int8 / int4)
  s.stochastic_rounding = False
  s.topk_fraction = 1 / 32  # kept per chunk (topk)
  s.topk_chunk = 4096
  s.topk_bits = 2  # bits per kept value: 2 | 4 | 8 | 32 (sign included)
  # minmax: sign + magnitude grid between the chunk's kept min / max | sigma: SparseLoCo's
  # 2^bits bins over the chunk's kept mean +- topk_sigmas / 2 sd, each decoded to its bin mean
  s.topk_quantizer = "minmax"
  s.topk_sigmas = 6.0  # sigma quantizer's range, in sd of the kept values
  # mean: over the islands that sent | selected: per coordinate, over the islands that kept it
  s.topk_aggregate = "mean"
  # demo (DeMo, Peng et al. 2024; Psyche's run settings): the k largest DCT coefficients of
  # each chunk of demo_chunk values (demo_2d: of each demo_chunk^2 values as a square tile)
  s.demo_chunk = 64
  s.demo_topk = 8
  s.demo_2d = True
  s.demo_sign = True  # 1 bit per kept coefficient, decoded +-1 (needs optimizer=sign_sgd)
  # mean: of the decoded payloads over the islands that sent | selected: each DCT coefficient
  # over the islands that kept it (the authors' scatter-mean; mesh-axis mode)
  s.demo_aggregate = "mean"
  s.error_feedback = 0.0  # beta: e <- beta e + delta; 0 = off
  # NoLoCo (Kolehmainen et al. 2025, fedjax_lm/engine/merges/noloco.py): none | noloco (no
  # all-reduce: each outer step every island averages with one random peer and steps its own
  # outer copy); gossip_gamma: the pull toward the pair's mean copy (None: the outer lr).
  s.gossip = "none"
  s.gossip_gamma = config_dict.placeholder(float)
  # DES-LOC (Iacob et al. 2025, fedjax_lm/engine/desloc.py): the islands average the inner
  # optimizer's first moment (Adam's mu, SGD momentum's trace) every desloc_mu_every steps and
  # the second (Adam's nu) every desloc_nu_every steps; 0 = never (DiLoCo: moments stay local).
  # The paper recommends 3 x and 6 x outer.sync_every.
  s.desloc_mu_every = 0
  s.desloc_nu_every = 0
  # HeLoCo (Al Asif et al. 2026, outer.optimizer=heloco, fedjax_lm/outer/heloco.py): per
  # parameter leaf, the pseudo-gradient's cosine c with the outer momentum; c >= c_ok passes,
  # c < 0 is shrunk along the momentum (k_s, capped at beta_max), 0 <= c < c_ok turned toward
  # it (k_d); both scaled by |d| / (|d| + kappa |m| + eps).
  s.heloco_c_ok = 0.2
  s.heloco_k_s = 1.0
  s.heloco_beta_max = 0.5
  s.heloco_k_d = 0.5
  s.heloco_kappa = 1.0
  s.heloco_eps = 1e-8
  # HALoS (Kim et al. 2025, fedjax_lm/outer/halos.py): outer.halos_regions = R > 0 groups the M
  # islands into R regions, each with a local parameter server (Delayed Nesterov halos_local_*),
  # under a global one (halos_global_*); a region sends its progress every halos_k arrivals and
  # merges the global params back with weight halos_alpha. Runs on a timing model
  # (python -m experiments.halos: islands.step_seconds, islands.speed, halos_wan_seconds one
  # way); the defaults are the authors' run script's.
  s.halos_regions = 0
  s.halos_k = 32
  s.halos_alpha = 0.25
  s.halos_local_lr = 3.2
  s.halos_local_momentum = 0.9
  s.halos_local_every = 16
  s.halos_global_lr = 0.3
  s.halos_global_momentum = 0.5
  s.halos_global_every = 2
  s.halos_wan_seconds = 0.0
  return s


def _inner() -> ml_collections.ConfigDict:
  """The inner optimizer of every island (DDP: the only one)."""
  s = ml_collections.ConfigDict()
  s.optimizer = "adamw"  # adamw | sgd | muon
  s.learning_rate = 3e-3
  s.warmup_steps = 50
  s.min_lr_ratio = 0.1
  s.b1 = 0.9
  s.b2 = 0.95
  s.weight_decay = 0.1
  s.momentum = 0.0  # sgd only
  s.grad_clip = 1.0
  return s


def _data() -> ml_collections.ConfigDict:
  """The dataset, tokenizer and per-island batch."""
  s = ml_collections.ConfigDict()
  s.name = "shakespeare"  # or any TFDS catalog name: lm1b, c4/en, tiny_shakespeare, ...
  s.data_dir = ""  # TFDS data dir; "" = TFDS default (~/tensorflow_datasets)
  s.text_key = "text"
  s.tokenizer = "byte"  # byte | sentencepiece:/path/to/model.model
  s.seq_len = 256
  s.batch_size = 32  # rows per island per step; global batch = islands.num x batch_size
  s.partition = "iid"  # iid | by_play | by_genre (how islands split the data)
  s.append_eos = False
  return s


def _launch() -> ml_collections.ConfigDict:
  """How the processes (or decoupled roles) of a run start and find each other."""
  s = ml_collections.ConfigDict()
  # local (spawn launch.processes here) | cluster | none | decoupled (a syncer and M island
  # jobs: here, or one role per scheduler job with launch.role / island / syncer)
  s.mode = "local"
  s.processes = 1
  s.pin_cores = True  # local: each process on its own cores (launch.core_groups)
  s.heartbeat_seconds = 20  # a dead peer is detected within this (cluster and local)
  s.role = ""  # decoupled: "" (start every role here) | syncer | island
  s.island = 0  # decoupled island: which one (its data partition)
  s.syncer = ""  # decoupled: the syncer's HOST:PORT (sharded: one per shard, comma-separated)
  # decoupled, sync policy: the syncer as S shard processes, shard s owning the fragments
  # p % S == s (its own port, checkpoint and restart); needs outer.fragments >= S
  s.syncer_shards = 1
  s.syncer_shard = 0  # decoupled syncer role: which shard this process is
  # decoupled HALoS (outer.halos_regions = R > 0, fedjax_lm/decoupled/region.py): launch.syncer
  # is the global syncer, launch.regions the R regional syncers' HOST:PORT (island k sends to
  # region k // (M / R)'s); a syncer role with launch.region = r >= 0 is region r's, -1 the
  # global one; region_push: async (a region keeps serving its islands while its push to the
  # global syncer is in flight, as HALoS) | sync (it waits: the timing model with no WAN delay)
  s.regions = ""
  s.region = -1
  s.region_push = "async"
  # the syncer saves every N rounds (sync; 0 = 1: a round's mean is delivered once durable)
  # or N updates (async; 0 = islands.num); a restarted one loses at most N - 1 of them
  s.syncer_checkpoint_every = 0
  s.join = ""  # decoupled, local: islands that join later, "island:step,..." (<max_num)
  # decoupled: rounds wait this long for an expected island (the first islands.num from the
  # start, a launch.join one once the run is that far) to join before going on without it
  s.join_grace_seconds = 120.0
  # decoupled: the syncer refuses (logs, and leaves out of the sum) a payload whose norm exceeds
  # norm_bound x the median of the fragment's last norm_window accepted ones (0 = no norm
  # check; a non-finite payload is refused either way) (fedjax_lm/decoupled/validate.py)
  s.norm_bound = 10.0
  s.norm_window = 8
  # Network paths between processes (the host link): the job's shared secret (the local
  # launcher makes one; on a cluster, a file the scheduler distributes) and the interface to
  # listen on ("" = the address the process advertises; never 0.0.0.0 by default).
  s.secret_file = ""
  s.interface = ""
  # Decoupled mode, mutual TLS on the syncer's channel (PEM files: the job's CA, this role's
  # certificate and key, signed by that CA; `python -m fedjax_lm.decoupled.pki DIR` makes
  # them); the per-island keys decide membership either way. Required when the syncer is not
  # on loopback, unless plaintext=True (e.g. inside a VPN that already encrypts).
  s.tls_ca = ""
  s.tls_cert = ""
  s.tls_key = ""
  s.plaintext = False
  # Decoupled mode: a call whose request or reply may exceed this many bytes (a payload, a
  # mean, a joiner's state) takes the channel's bulk path, one TCP (or mutual-TLS) connection
  # with the same tokens, signed heads and chunk tags (fedjax_lm/decoupled/bulk.py: 0.61 of raw
  # TCP at the 1B size, gRPC's Python path 0.25); -1: every call over gRPC
  s.bulk_min_bytes = 16 << 20
  # ... its listener on the syncer's gRPC port + this (a firewall that opens fixed ports;
  # 0: a free port, told to members by an authenticated gRPC call)
  s.bulk_port_offset = 0
  # Decoupled mode: the sends a syncer (shard) receives and sums at once, each into a receive
  # buffer of one payload (its host memory beyond its state: this many payloads; 1 serialises
  # the islands' uploads to it)
  s.syncer_send_slots = 2
  return s


def load_file(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file (what ``--config PATH`` loads)."""
  spec = importlib.util.spec_from_file_location(os.path.basename(path).removesuffix(".py"), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def layout(c) -> dict:
  """The config fields that fix the training state's shapes and structure (what a checkpoint
  must match to be restored); the mesh is not among them (state is resharded on restore)."""
  out = {"algorithm": c.algorithm, "islands.num": int(c.islands.num),
         "inner.optimizer": c.inner.optimizer,
         **{f"model.{k}": v for k, v in c.model.items()
            if k in ("vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads",
                     "head_dim", "mlp_dim", "tie_embeddings", "param_dtype")}}
  if c.algorithm == "islands":
    out.update({"outer.optimizer": c.outer.optimizer, "outer.fragments": int(c.outer.fragments),
                "outer.compression": c.outer.compression, "outer.eager": bool(c.outer.eager),
                "outer.delay": c.outer.delay,
                "outer.error_feedback_on": float(c.outer.error_feedback) > 0})
    if c.outer.gossip != "none":
      out["outer.gossip"] = c.outer.gossip
  return out


def override(c, dotted: dict) -> None:
  """Sets ``{"outer.sync_every": 10, ...}`` in place (``c`` unlocked for new values)."""
  for key, value in dotted.items():
    node = c
    *parents, leaf = key.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = value


def _check(ok: bool, msg: str) -> None:
  if not ok:
    raise ValueError(msg)


def validate(c) -> None:
  """One clear error naming the first bad value."""
  _validate_training(c)
  _validate_noloco(c)
  _validate_desloc(c)
  _validate_halos(c)
  engine.validate(c)
  _validate_launch(c)
  tokens.validate(c)
  faults.validate(c)


def _validate_training(c) -> None:
  """The run, inner optimizer, data, outer codec and island health fields."""
  _check(c.algorithm in engine.ALGORITHMS,
         f"algorithm={c.algorithm!r}: expected one of {engine.ALGORITHMS}")
  _check(c.inner.optimizer in steps.INNER_OPTIMIZERS,
         f"inner.optimizer={c.inner.optimizer!r}: expected one of {steps.INNER_OPTIMIZERS}")
  _check(c.data.partition in PARTITIONS,
         f"data.partition={c.data.partition!r}: expected one of {PARTITIONS}")
  for key in ("total_steps", "log_every", "eval_every", "checkpoint_every", "eval_batch_size",
              "eval_batches", "keep_checkpoints"):
    _check(int(c[key]) > 0, f"{key}={c[key]} must be positive")
  _check(float(c.outer.clip_norm) >= 0, f"outer.clip_norm={c.outer.clip_norm} must be >= 0")
  _check(c.outer.topk_quantizer in ("minmax", "sigma"),
         f"outer.topk_quantizer={c.outer.topk_quantizer!r}: expected minmax or sigma")
  _check(c.outer.topk_aggregate in ("mean", "selected"),
         f"outer.topk_aggregate={c.outer.topk_aggregate!r}: expected mean or selected")
  _check(float(c.outer.topk_sigmas) > 0,
         f"outer.topk_sigmas={c.outer.topk_sigmas} must be > 0")
  _check(int(c.outer.demo_chunk) >= 1, f"outer.demo_chunk={c.outer.demo_chunk} must be >= 1")
  _check(int(c.outer.demo_topk) >= 1, f"outer.demo_topk={c.outer.demo_topk} must be >= 1")
  _check(c.outer.compression != "demo" or not c.outer.demo_sign or
         c.outer.optimizer == "sign_sgd",
         f"outer.demo_sign=True decodes kept coefficients as +-1 (no scale): it needs "
         f"outer.optimizer=sign_sgd, not {c.outer.optimizer!r}")
  _check(c.outer.demo_aggregate in ("mean", "selected"),
         f"outer.demo_aggregate={c.outer.demo_aggregate!r}: expected mean or selected")
  _check(c.outer.compression != "demo" or c.outer.demo_aggregate == "mean" or
         c.launch.mode != "decoupled",
         "outer.demo_aggregate=selected needs the mesh-axis exchange (the decoupled syncer "
         "sums decoded payloads); use launch.mode local / cluster / none")
  _check(float(c.inner.grad_clip) >= 0, f"inner.grad_clip={c.inner.grad_clip} must be >= 0")
  bad_heloco = heloco.check(heloco.settings(c.outer))
  _check(bad_heloco is None, bad_heloco)
  _check(int(c.islands.num) >= 1, f"islands.num={c.islands.num} must be >= 1")
  _check(int(c.islands.simulated_groups) >= 0,
         f"islands.simulated_groups={c.islands.simulated_groups} must be >= 0")
  _check(int(c.islands.max_nonfinite) >= 1,
         f"islands.max_nonfinite={c.islands.max_nonfinite} must be >= 1")
  _check(c.islands.absent_policy in health.ABSENT_POLICIES,
         f"islands.absent_policy={c.islands.absent_policy!r}: expected one of "
         f"{health.ABSENT_POLICIES}")
  _check(c.data.seq_len <= c.model.max_len,
         f"data.seq_len={c.data.seq_len} exceeds model.max_len={c.model.max_len}")


def _validate_desloc(c) -> None:
  """outer.desloc_mu_every / desloc_nu_every: mesh-axis islands whose inner optimizer has the
  moment, every island in every average."""
  oc = c.outer
  for key in ("desloc_mu_every", "desloc_nu_every"):
    _check(int(oc[key]) >= 0, f"outer.{key}={oc[key]} must be >= 0 (0 = never)")
  if not (int(oc.desloc_mu_every) or int(oc.desloc_nu_every)):
    return
  key = "outer.desloc_mu_every" if int(oc.desloc_mu_every) else "outer.desloc_nu_every"
  _check(c.algorithm == "islands", f"{key} needs algorithm=islands (DDP has no local moments)")
  _check(c.launch.mode != "decoupled",
         f"{key} is not supported with launch.mode=decoupled: the moments are averaged by an "
         "XLA collective over the island mesh axis")
  _check(not float(c.islands.dropout) and not c.islands.absent,
         f"{key} needs islands.dropout=0 and islands.absent='': every island takes part in "
         "each moment average")
  _check(not oc.reset_inner_opt_state,
         f"{key} averages the inner optimizer's moments: leave outer.reset_inner_opt_state False")
  _check(not int(oc.desloc_nu_every) or c.inner.optimizer == "adamw",
         f"outer.desloc_nu_every needs inner.optimizer=adamw (got {c.inner.optimizer!r}: no "
         "second moment)")
  _check(not int(oc.desloc_mu_every) or c.inner.optimizer == "adamw" or (
      c.inner.optimizer == "sgd" and float(c.inner.momentum) > 0),
         f"outer.desloc_mu_every needs inner.optimizer=adamw, or sgd with inner.momentum > 0 "
         f"(got {c.inner.optimizer!r})")


def _validate_noloco(c) -> None:
  """outer.gossip=noloco: mesh-axis islands, a power-of-two M, float32 payloads, no overlap."""
  oc = c.outer
  _check(oc.gossip in noloco.GOSSIP, f"outer.gossip={oc.gossip!r}: expected one of "
         f"{noloco.GOSSIP}")
  _check(oc.gossip_gamma is None or float(oc.gossip_gamma) >= 0,
         f"outer.gossip_gamma={oc.gossip_gamma} must be >= 0 (None: the outer learning rate)")
  if oc.gossip == "none":
    return
  _check(c.algorithm == "islands", "outer.gossip=noloco needs algorithm=islands")
  _check(c.launch.mode != "decoupled",
         "outer.gossip=noloco is not supported with launch.mode=decoupled: its peer exchange "
         "is a ppermute over the island mesh axis (the syncer would be an all-reduce)")
  _check(noloco.check_num(int(c.islands.num)),
         f"outer.gossip=noloco pairs island m with m XOR d: islands.num={c.islands.num} must "
         "be a power of two")
  for key, ok in (("outer.compression", oc.compression == "none"),
                  ("outer.error_feedback", not float(oc.error_feedback)),
                  ("outer.fragments", int(oc.fragments) == 1),
                  ("outer.overlap", int(oc.overlap) == 0),
                  ("outer.mixing", not float(oc.mixing)), ("outer.eager", not oc.eager),
                  ("outer.delay", oc.delay == "none"), ("outer.transport", oc.transport == "xla")):
    _check(ok, f"outer.gossip=noloco sends float32 copies to one peer at each sync: leave "
               f"{key} at its default")


def _validate_launch(c) -> None:
  """How the run is launched (decoupled mode: :func:`_validate_decoupled`)."""
  _check(c.launch.mode in ("local", "cluster", "none", "decoupled"),
         f"launch.mode={c.launch.mode!r}: expected local, cluster, none or decoupled")
  if c.launch.mode == "decoupled":
    _validate_decoupled(c)
  _check(int(c.launch.processes) >= 1, f"launch.processes={c.launch.processes} must be >= 1")
  _check(float(c.islands.step_seconds) >= 0,
         f"islands.step_seconds={c.islands.step_seconds} must be >= 0")
  _check(int(c.launch.syncer_checkpoint_every) >= 0,
         f"launch.syncer_checkpoint_every={c.launch.syncer_checkpoint_every} must be >= 0")
  _check(float(c.launch.join_grace_seconds) > 0,
         f"launch.join_grace_seconds={c.launch.join_grace_seconds} must be > 0")
  _check(int(c.launch.bulk_min_bytes) >= -1,
         f"launch.bulk_min_bytes={c.launch.bulk_min_bytes} must be >= -1 (-1: gRPC only)")
  _check(0 <= int(c.launch.bulk_port_offset) < 65536,
         f"launch.bulk_port_offset={c.launch.bulk_port_offset} must be in [0, 65536)")
  _check(int(c.launch.syncer_send_slots) >= 1,
         f"launch.syncer_send_slots={c.launch.syncer_send_slots} must be >= 1")
  _check(int(c.launch.heartbeat_seconds) >= 1,
         f"launch.heartbeat_seconds={c.launch.heartbeat_seconds} must be >= 1")
  _check(float(c.launch.norm_bound) == 0 or 1 < float(c.launch.norm_bound) < float("inf"),
         f"launch.norm_bound={c.launch.norm_bound} must be 0 (off) or > 1")
  _check(int(c.launch.norm_window) >= 1,
         f"launch.norm_window={c.launch.norm_window} must be >= 1")


def _loopback(host: str) -> bool:
  """Whether ``host`` (an IP or a name) is this machine's loopback."""
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def _validate_halos(c) -> None:
  """outer.halos_*: the settings, checked whenever HALoS's tiers are on."""
  if int(c.outer.halos_regions):
    _check(c.algorithm == "islands", "outer.halos_regions needs algorithm=islands")
    bad = halos.check(halos.Settings.from_config(c.outer), int(c.islands.num))
    _check(bad is None, str(bad))


def _validate_decoupled(c) -> None:
  """launch.mode=decoupled: a syncer and island jobs."""
  _check(c.algorithm == "islands", "launch.mode=decoupled needs algorithm=islands")
  _check(c.outer.policy in ("sync", "async"),
         f"outer.policy={c.outer.policy!r}: expected sync or async")
  _check(not c.outer.eager or c.outer.policy == "sync",
         "outer.eager needs outer.policy=sync (its estimate stands in for a round's mean; async "
         "has no rounds)")
  _check(c.outer.policy == "sync" or (int(c.outer.fragments) == 1 and
                                      int(c.outer.overlap) == 0),
         "outer.policy=async needs outer.fragments=1 and outer.overlap=0")
  _check(c.outer.delay == "none" or c.outer.policy == "sync",
         "outer.delay needs outer.policy=sync (async applies each send on arrival)")
  _check(c.outer.transport == "xla",
         f"outer.transport={c.outer.transport!r} has no meaning with launch.mode=decoupled: each "
         "island job holds one island and its link is the syncer; leave it at 'xla'")
  _check(c.launch.role in ("", "syncer", "island"),
         f"launch.role={c.launch.role!r}: expected '', syncer or island")
  _check(int(c.outer.quorum) >= 0, f"outer.quorum={c.outer.quorum} must be >= 0")
  if int(c.outer.halos_regions):
    from fedjax_lm.decoupled import region  # pylint: disable=g-import-not-at-top
    bad = region.validate(c)
    _check(bad is None, str(bad))
  shards = int(c.launch.syncer_shards)
  _check(1 <= shards <= int(c.outer.fragments),
         f"launch.syncer_shards={shards} must be in [1, outer.fragments={c.outer.fragments}]: "
         "a shard owns whole fragments")
  _check(shards == 1 or (c.outer.policy == "sync" and not c.outer.eager),
         f"launch.syncer_shards={shards} needs outer.policy=sync and outer.eager=False")
  _check(0 <= int(c.launch.syncer_shard) < shards,
         f"launch.syncer_shard={c.launch.syncer_shard} must be in [0, {shards})")
  addresses = [a for a in c.launch.syncer.split(",") if a]
  _check(not c.launch.role or (len(addresses) == shards and all(":" in a for a in addresses)),
         f"launch.syncer={c.launch.syncer!r}: expected HOST:PORT"
         + (f", one per shard ({shards}, comma-separated)" if shards > 1 else ""))
  _check(int(c.islands.max_num) in (0,) or int(c.islands.max_num) >= int(c.islands.num),
         f"islands.max_num={c.islands.max_num} must be 0 or >= islands.num")
  hosts = [c.launch.interface] if c.launch.interface else [
      a.rpartition(":")[0] for a in addresses] or ["127.0.0.1"]
  host = next((h for h in (h.strip("[]") or "127.0.0.1" for h in hosts) if not _loopback(h)),
              "127.0.0.1")
  _check(_loopback(host) or c.launch.tls_ca or c.launch.plaintext,
         f"launch.syncer={c.launch.syncer!r} is not on loopback: mutual TLS is required there "
         "(make the job's certificates with `python -m fedjax_lm.decoupled.pki DIR --hosts "
         f"{host}` and set launch.tls_ca, tls_cert, tls_key), or set launch.plaintext=True")
  parts = int(c.islands.max_num) or int(c.islands.num)
  for island, _ in health.parse_pairs(c.launch.join, "launch.join"):
    _check(int(c.islands.num) <= island < parts,
           f"launch.join names island {island}: joining islands are islands.num.."
           f"islands.max_num-1 ({int(c.islands.num)}..{parts - 1})")
