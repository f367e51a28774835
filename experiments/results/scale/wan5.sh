#!/bin/bash
# Item 5: the WAN testbed at c4_150m's DDP link/compute ratio (67.2).
set -e
cd "$(dirname "$0")/../../.."  # the repository root
. .venv/bin/activate
W=runs/scale_wan
COMMON="--config.mesh.island=2 --config.mesh.data=1 --config.launch.processes=2 --config.log_every=1 --config.checkpoint_every=100000 --config.data.batch_size=4 --config.eval_batches=4 --config.eval_every=25"
J="--jax_cache $W/jax_cache"
# 1. DDP unshaped, 100 steps: its loss curve (the target) and the testbed's compute step.
python -m experiments.wan --config configs/shakespeare_ddp.py --bandwidth none --workdir $W/ddp_free $J $COMMON --config.total_steps=100 > $W/ddp_free.json.txt 2>&1
TC=$(python -c "import json,re; t=open('$W/ddp_free.json.txt').read(); d=json.loads(t[t.index('{'):]); print(d['median_step_s'])")
RATE=$(python -c "print(int(4*984192*8/(67.2*$TC)/1000))")  # kbit/s; params of the default model set below
echo "t_c=$TC rate=${RATE}kbit" > $W/rate.txt
# 2. DiLoCo and Streaming 4-bit, 250 steps, and DDP for 12 steps, at that rate.
python -m experiments.wan --config configs/shakespeare_diloco.py --bandwidth ${RATE}kbit --workdir $W/diloco $J $COMMON --config.total_steps=250 --config.outer.learning_rate=0.7 --config.outer.momentum=0.9 > $W/diloco.json.txt 2>&1
python -m experiments.wan --config configs/shakespeare_streaming.py --bandwidth ${RATE}kbit --workdir $W/streaming $J $COMMON --config.total_steps=250 --config.outer.transport=host > $W/streaming.json.txt 2>&1
python -m experiments.wan --config configs/shakespeare_ddp.py --bandwidth ${RATE}kbit --workdir $W/ddp_shaped $J $COMMON --config.total_steps=12 --config.eval_every=12 > $W/ddp_shaped.json.txt 2>&1
echo done >> $W/rate.txt
