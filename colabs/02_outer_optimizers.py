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
# # Outer optimizers are plain optax transforms
#
# At every sync the islands' **pseudo-gradient** `delta = global - mean(islands)` goes through
# an `optax.GradientTransformation`, exactly as a gradient would:
# `updates, state = tx.update(delta, state, global)`. FedAvg is outer SGD with lr 1, DiLoCo is
# outer Nesterov, FedOpt uses Adam on the server, SlowMo heavy-ball momentum. Any optax
# transform you write plugs in the same way. `SMOKE = True` (set by the tests) keeps runs short.

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

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax

from fedjax_lm import simulate

SMOKE = os.environ.get("FEDJAX_LM_SMOKE", "0") == "1"
ROOT = os.path.abspath("runs/02")
M, H = 2, 10 if SMOKE else 20


def islands_config(**outer):
  return simulate.config(SMOKE, algorithm="islands", islands={"num": M},
                         outer={"sync_every": H, **outer})


# %% [markdown]
# ## The built-in outer optimizers (by name in the config)

# %%
records = {name: simulate.run(islands_config(optimizer=name), f"{ROOT}/{name}")
           for name in ("fedavg", "diloco", "fedopt_adam", "slowmo")}

# %% [markdown]
# ## Your own outer optimizer in under 10 lines
# A sign-of-momentum outer step: keep a momentum of pseudo-gradients and move every
# parameter by a fixed `lr` along its sign. The state is a NamedTuple with the parameters'
# structure, so it is sharded like them.

# %%
def sign_momentum(lr: float = 0.01, beta: float = 0.9) -> optax.GradientTransformation:
  def init(params):
    return optax.TraceState(trace=jax.tree.map(jnp.zeros_like, params))
  def update(delta, state, params=None):
    m = jax.tree.map(lambda m, d: beta * m + d, state.trace, delta)
    return jax.tree.map(lambda x: -lr * jnp.sign(x), m), optax.TraceState(trace=m)
  return optax.GradientTransformation(init, update)

records["sign momentum (ours)"] = simulate.run(islands_config(), f"{ROOT}/sign_momentum",
                                               outer_tx=sign_momentum())

# %%
for name, recs in records.items():
  print(f"{name:20s} final eval {recs[-1]['eval_loss']:.3f} nats/byte")

# %% [markdown]
# ## Outer learning-rate sweep for DiLoCo (outer Nesterov, momentum 0.9)

# %%
lrs = [0.3, 1.0] if SMOKE else [0.1, 0.3, 1.0]
sweep = {lr: simulate.run(islands_config(optimizer="diloco", learning_rate=lr),
                          f"{ROOT}/diloco_lr{lr}")[-1]["eval_loss"] for lr in lrs}
sweep[0.7] = records["diloco"][-1]["eval_loss"]  # the default, run above
sweep = dict(sorted(sweep.items()))

# %%
fig, (ax_curves, ax_sweep) = plt.subplots(1, 2, figsize=(11, 4))
for name, recs in records.items():
  ax_curves.plot(*simulate.evals(recs), marker="o", label=name)
ax_curves.set(xlabel="inner step", ylabel="eval loss (nats/byte)", title=f"M={M}, H={H}")
ax_curves.legend()
ax_sweep.plot(list(sweep), list(sweep.values()), marker="o")
ax_sweep.set(xlabel="outer learning rate", ylabel="final eval loss", title="DiLoCo outer lr")
fig.tight_layout()
if os.environ.get("FEDJAX_LM_FIGURES"):
  fig.savefig(os.path.join(os.environ["FEDJAX_LM_FIGURES"], "02_outer_optimizers.png"), dpi=100)
