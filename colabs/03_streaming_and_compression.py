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
# # Streaming DiLoCo and compressed exchanges
#
# Three knobs cut what crosses the island axis and when:
# * `outer.compression`: the codec of the pseudo-gradient (`bf16`, `int8`, `int4`, `topk`),
#   optionally with error feedback (`outer.error_feedback`);
# * `outer.fragments` (P): sync 1/P of the parameters every H/P steps, so the *peak* bytes
#   of one sync fall by P;
# * `outer.overlap` (tau): the exchange of a fragment runs while the islands keep training.
#
# `island_bytes` counts encoded bytes (values, scales, indices, padding). `SMOKE = True`
# (set by the tests) keeps runs short.

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
import ml_collections

from fedjax_lm import codecs, simulate

SMOKE = os.environ.get("FEDJAX_LM_SMOKE", "0") == "1"
ROOT = os.path.abspath("runs/03")
M, H = 2, 10 if SMOKE else 20


def islands_config(**outer):
  return simulate.config(SMOKE, algorithm="islands", islands={"num": M},
                         outer={"optimizer": "diloco", "sync_every": H, **outer})


# %% [markdown]
# ## Loss against bytes for each codec (DiLoCo, P = 1)

# %%
codec_runs = {
    "float32": {}, "bf16": {"compression": "bf16"}, "int8": {"compression": "int8"},
    "int4": {"compression": "int4"},
    "top-k 1/32, 2-bit, EF": {"compression": "topk", "error_feedback": 0.95},
}
if SMOKE:
  codec_runs = {k: codec_runs[k] for k in ("float32", "int4", "top-k 1/32, 2-bit, EF")}
records = {name: simulate.run(islands_config(**outer), f"{ROOT}/{i}")
           for i, (name, outer) in enumerate(codec_runs.items())}
for name, recs in records.items():
  print(f"{name:22s} eval {recs[-1]['eval_loss']:.3f}  sent {recs[-1]['island_bytes']:>12,} B")

# %% [markdown]
# ## Peak bytes of one sync against the number of fragments
# Streaming runs (int4, overlap tau = 1): the total sent stays put, the largest single sync
# shrinks with P.

# %%
fragment_counts = [1, 2] if SMOKE else [1, 2, 4]  # P=1 with tau=1: DiLoCo with overlap
streaming = {p: simulate.run(islands_config(fragments=p, overlap=1, compression="int4"),
                             f"{ROOT}/P{p}") for p in fragment_counts}
for p, recs in streaming.items():
  print(f"P={p}: peak {recs[-1]['island_peak_bytes']:>10,} B per sync, "
        f"total {recs[-1]['island_bytes']:>12,} B, eval {recs[-1]['eval_loss']:.3f}")

# %% [markdown]
# ## What error feedback does to a fixed vector
# Send the same vector `d` 50 times through 2-bit top-k (1/32 kept). Without error feedback
# the receiver's running sum of decoded messages keeps missing the same dropped coordinates;
# with it (beta = 1) the residual carries them until they are sent, and the running mean of
# what arrived converges to `d`.

# %%
outer_cfg = ml_collections.ConfigDict(dict(
    compression="topk", quant_block=256, stochastic_rounding=False, topk_fraction=1 / 32,
    topk_chunk=1024, topk_bits=2))
codec = codecs.from_config(outer_cfg)
d = jax.random.normal(jax.random.key(0), (8192,))


def relative_error(beta: float, rounds: int = 50) -> list[float]:
  residual, received, errors = jnp.zeros_like(d), jnp.zeros_like(d), []
  for r in range(1, rounds + 1):
    if beta:
      payload, residual = codecs.error_feedback_step(codec, beta, d, residual, None)
    else:
      payload = codec.encode(d, None)
    received = received + codec.decode(payload)
    errors.append(float(jnp.linalg.norm(received / r - d) / jnp.linalg.norm(d)))
  return errors


no_ef, ef = relative_error(0.0), relative_error(1.0)
print(f"after 50 sends: relative error {no_ef[-1]:.3f} without EF, {ef[-1]:.3f} with EF")

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for name, recs in records.items():
  axes[0].plot(*simulate.evals(recs, "island_bytes"), marker="o", label=name)
axes[0].set(xscale="log", xlabel="bytes sent per island", ylabel="eval loss (nats/byte)",
            title="codecs (DiLoCo)")
axes[0].legend(fontsize=8)
axes[1].bar([str(p) for p in streaming],
            [recs[-1]["island_peak_bytes"] / 1e3 for recs in streaming.values()])
axes[1].set(xlabel="fragments P", ylabel="peak KB per sync", title="streaming, int4")
axes[2].plot(no_ef, label="no error feedback")
axes[2].plot(ef, label="error feedback, beta=1")
axes[2].set(yscale="log", xlabel="sends", ylabel="|mean received - d| / |d|",
            title="top-k 1/32, 2-bit on a fixed vector")
axes[2].legend()
fig.tight_layout()
if os.environ.get("FEDJAX_LM_FIGURES"):
  fig.savefig(os.path.join(os.environ["FEDJAX_LM_FIGURES"], "03_streaming_and_compression.png"),
              dpi=100)
