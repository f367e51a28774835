"""HALoS (Kim et al., ICML 2025, arXiv 2506.04531) on Shakespeare at the authors' settings, on a
timing model: 4 regions x 4 workers, each region its own hardware speed, a slow WAN between the
regions' parameter servers and the global one (``fedjax_lm/outer/halos.py``,
``fedjax_lm/hierarchy.py``). Run it beside flat asynchronous and synchronous DiLoCo:

    python -m experiments.halos --config configs/shakespeare_halos.py --out DIR/summary.md

| hyper-parameter            | value here                        | the authors' run script (Pythia-70M) |
|----------------------------|-----------------------------------|--------------------------------------|
| regions x workers          | 4 x 4                             | 4 x 4                                |
| H (worker steps a phase)   | 8                                 | 8                                    |
| K (LPS arrivals a push)    | 32                                | 32                                   |
| merge weight alpha         | 0.25                              | 0.25                                 |
| LPS Delayed Nesterov       | lr 0.2 x 16, beta 0.9, every 16   | the same                             |
| GPS Delayed Nesterov       | lr 0.15 x 2, beta 0.5, every 2    | the same                             |
| worker                     | AdamW 3e-3, cosine (the DiLoCo    | AdamW, cosine after linear warm-up   |
|                            | config's), 2 rows x 256 bytes     |                                      |
| speeds (per region)        | 1, 0.75, 0.5, 0.25                | heterogeneous accelerators           |
| WAN one way                | 8 s (one phase at speed 1)        | measured bandwidths                  |
| tokens                     | 16 x 1,000 steps x 2 rows: the    |                                      |
|                            | DiLoCo config's 32 rows a step    |                                      |

The flat asynchronous run (``async``) and the synchronous one (``sync``) use this config's
``outer`` (Nesterov 0.7 / 0.5; Delayed Nesterov every M arrivals) and H.

The same tiers as processes (a global syncer, R regional syncers, M island jobs:
``fedjax_lm/decoupled/region.py``), here or one role per scheduler job::

    python -m experiments.train --config configs/shakespeare_halos.py --workdir DIR \
        --config.launch.mode=decoupled --config.outer.policy=async

and on the WAN testbed beside flat async and sync DiLoCo: ``sudo python -m
experiments.halos_wan``.
"""

from configs import shakespeare_diloco


def get_config():
  c = shakespeare_diloco.get_config()  # (the model, data, steps, evals and outer step)
  c.unlock()
  c.islands.num = 16
  c.data.batch_size = 2
  c.outer.sync_every = 8
  c.outer.halos_regions = 4
  c.islands.speed = ",".join(str(s) for s in (1.0, 0.75, 0.5, 0.25) for _ in range(4))
  c.islands.step_seconds = 1.0
  c.outer.halos_wan_seconds = 8.0
  c.mesh.island = 1
  c.mesh.data = 1
  c.launch.processes = 1
  c.lock()
  return c
