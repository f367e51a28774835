# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # DiLoCo in five minutes
#
# Train the same byte-level transformer on Shakespeare three ways, with M = 2 islands
# simulated on this one CPU device (island axis 1, no collectives):
#
# * **DDP**: gradients averaged over both islands every step (what a fast link allows);
# * **FedAvg / Local SGD**: islands train H steps alone, then the global model moves to their
#   mean (outer SGD, lr 1);
# * **DiLoCo**: the same, but the pseudo-gradient `global - mean(islands)` feeds outer
#   Nesterov momentum (lr 0.7, momentum 0.9).
#
# Then plot eval loss against steps and against the bytes each island sent across the
# island axis. `SMOKE = True` (set by the tests) makes every run a few seconds long.

# %%
# Installs fedjax_lm on a fresh runtime; a no-op where it is already importable. On Colab set
# FEDJAX_LM_SOURCE to your clone's pip source, e.g. "git+https://github.com/<you>/fedjax_lm".
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("fedjax_lm") is None:
  source = ".." if os.path.exists("../pyproject.toml") else os.environ["FEDJAX_LM_SOURCE"]
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", f"{source}[notebooks]"])

# %%
# fedjax_lm's CPU runtime defaults (XLA flags: fedjax_lm/cpu.py) first, before JAX starts.
from fedjax_lm import cpu
cpu.apply_defaults(reexec=False)

import os

import matplotlib.pyplot as plt

from fedjax_lm import simulate

SMOKE = os.environ.get("FEDJAX_LM_SMOKE", "0") == "1"
ROOT = os.path.abspath("runs/01")
M, H = 2, 10 if SMOKE else 20

# %% [markdown]
# ## Three methods, one config each
# `simulate.config` starts from the project's base config (a 4-layer, d=128 model; the smoke
# switch shrinks it) with every island on the one device. `data.batch_size` is per island, so
# all three methods see the same tokens.

# %%
methods = {
    "DDP": simulate.config(SMOKE, algorithm="ddp", islands={"num": M}),
    "FedAvg": simulate.config(SMOKE, algorithm="islands", islands={"num": M},
                              outer={"optimizer": "fedavg", "sync_every": H}),
    "DiLoCo": simulate.config(SMOKE, algorithm="islands", islands={"num": M},
                              outer={"optimizer": "diloco", "sync_every": H}),
}
records = {name: simulate.run(cfg, f"{ROOT}/{name}") for name, cfg in methods.items()}

# %%
for name, recs in records.items():
  last = recs[-1]
  print(f"{name:7s} eval {last['eval_loss']:.3f} nats/byte  "
        f"island bytes {last['island_bytes'] / 1e6:8.2f} MB")

# %% [markdown]
# ## Loss against steps and against bytes sent
# DDP sends a full gradient every step; the island methods send one pseudo-gradient every H
# steps, so their curves sit about H times further left on the bytes axis.

# %%
fig, (ax_step, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4))
for name, recs in records.items():
  ax_step.plot(*simulate.evals(recs, "step"), marker="o", label=name)
  ax_bytes.plot(*simulate.evals(recs, "island_bytes"), marker="o", label=name)
ax_step.set(xlabel="inner step", ylabel="eval loss (nats/byte)", title=f"M={M}, H={H}")
ax_bytes.set(xlabel="bytes sent per island", xscale="log", title="loss per byte")
ax_step.legend()
fig.tight_layout()
if os.environ.get("FEDJAX_LM_FIGURES"):
  fig.savefig(os.path.join(os.environ["FEDJAX_LM_FIGURES"], "01_diloco_in_five_minutes.png"),
              dpi=100)
