"""Train a language model: ``python -m experiments.train --config configs/X.py --workdir DIR``.

Override any config key with ``--config.key=value`` (e.g. ``--config.total_steps=100``).
With ``launch.mode=local`` and ``launch.processes=N > 1`` this command starts N local processes
(one CPU device each, joined by jax.distributed over loopback) and shows process 0's output;
with ``launch.mode=cluster`` each process calls ``jax.distributed.initialize()`` with the
cluster's own settings (start one per host with your scheduler).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedjax_lm import cpu
from fedjax_lm import launch

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare.py",
                                          "Path to a config file with get_config().")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, logs.",
                               required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  workdir = _WORKDIR.value
  num = int(config.launch.processes)
  if config.launch.mode == "decoupled":
    sys.exit(_decoupled(config, workdir))
  if config.launch.mode == "local" and num > 1 and not launch.is_launched_child():
    command = [sys.executable, "-m", "experiments.train", *sys.argv[1:]]
    sys.exit(launch.launch_local(command, num, log_dir=os.path.join(workdir, "logs"),
                                 pin_cores=bool(config.launch.pin_cores)))
  if config.launch.mode in ("local", "none") and not launch.is_launched_child():
    cpu.emulate_island_devices(config)  # before JAX starts its CPU backend
  launch.initialize(config.launch.mode, int(config.launch.heartbeat_seconds),
                    interface=config.launch.interface)
  # pylint: disable-next=g-import-not-at-top  (after distributed init)
  import jax
  from fedjax_lm import checkpoint as ckpt_lib
  from fedjax_lm import train
  try:
    train.train(config, workdir)
  except ckpt_lib.Preempted as e:
    sys.exit(f"[fedjax_lm] {e}" if jax.process_index() == 0 else 143)
  except (ValueError, RuntimeError, OSError) as e:
    if os.environ.get("FEDJAX_LM_TRACEBACK") == "1":
      raise
    sys.exit(f"error: {e}".splitlines()[0])  # one line; FEDJAX_LM_TRACEBACK=1 shows the trace


def _decoupled(config, workdir) -> int:
  """``launch.mode=decoupled``: every role here (no ``launch.role``), or the one named."""
  # pylint: disable-next=g-import-not-at-top  (jax only after the role is known)
  from fedjax_lm import config_lib
  from fedjax_lm.decoupled import channel, island, launch as decoupled_launch, syncer
  try:
    config_lib.validate(config)
    if not config.launch.role:
      command = [sys.executable, "-m", "experiments.train", *sys.argv[1:]]
      return decoupled_launch.run(command, config, workdir)
    if config.launch.role == "syncer":
      syncer.serve(config, workdir)
    else:
      island.run(config, workdir)
  except (ValueError, RuntimeError, OSError, channel.SyncerUnreachable) as e:
    if os.environ.get("FEDJAX_LM_TRACEBACK") == "1":
      raise
    return f"error: {e}".splitlines()[0]
  return 0


def _parse_flags(argv):
  """absl flag parsing, with a bad ``--config.key`` reported as one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    what = f"unknown config key {e}" if isinstance(e, (AttributeError, KeyError)) else str(e)
    sys.exit(f"error: bad config override among {bad}: {what}".replace('"', ""))


if __name__ == "__main__":
  cpu.apply_defaults()
  app.run(main, flags_parser=_parse_flags)
