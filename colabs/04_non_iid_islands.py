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
# # Non-iid islands: each island reads its own plays
#
# `data.partition` decides what each island trains on: `iid` (every island samples the whole
# corpus), `by_play` (plays dealt round-robin to islands) or `by_genre` (comedies, histories,
# tragedies, ... each on its own island). Eval is always on the same held-out iid set, so the
# curves compare how well the *global* model generalises when islands drift apart.
# `SMOKE = True` (set by the tests) keeps runs short.

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
ROOT = os.path.abspath("runs/04")
M, H = 2, 10 if SMOKE else 20
partitions = ["iid", "by_genre"] if SMOKE else ["iid", "by_play", "by_genre"]
optimizers = ["diloco"] if SMOKE else ["fedavg", "diloco"]

# %%
records = {}
for optimizer in optimizers:
  for partition in partitions:
    config = simulate.config(SMOKE, algorithm="islands", islands={"num": M},
                             data={"partition": partition},
                             outer={"optimizer": optimizer, "sync_every": H})
    recs = records[optimizer, partition] = simulate.run(config, f"{ROOT}/{optimizer}_{partition}")
    print(f"{optimizer:7s} {partition:9s} final eval {recs[-1]['eval_loss']:.3f}")

# %% [markdown]
# ## Global eval loss, and each island's own training loss
# On non-iid partitions the islands' training losses split apart (each fits its own plays)
# while the global model is evaluated on everything.

# %%
fig, axes = plt.subplots(1, 1 + len(partitions), figsize=(5 * (1 + len(partitions)), 4))
for (optimizer, partition), recs in records.items():
  axes[0].plot(*simulate.evals(recs), marker="o", label=f"{optimizer}, {partition}")
axes[0].set(xlabel="inner step", ylabel="global eval loss (nats/byte)", title=f"M={M}, H={H}")
axes[0].legend(fontsize=8)
for ax, partition in zip(axes[1:], partitions):
  recs = records[optimizers[-1], partition]
  steps = [r["step"] for r in recs]
  for m in range(M):
    ax.plot(steps, [r["island_loss"][m] for r in recs], label=f"island {m}")
  ax.set(xlabel="inner step", ylabel="island train loss", title=f"{optimizers[-1]}, {partition}")
  ax.legend()
fig.tight_layout()
if os.environ.get("FEDJAX_LM_FIGURES"):
  fig.savefig(os.path.join(os.environ["FEDJAX_LM_FIGURES"], "04_non_iid_islands.png"), dpi=100)
