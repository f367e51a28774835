#!/bin/bash
# Item 5, continued: the host link needs a job secret (the local launcher makes one; the
# testbed's plain-scheduler start does not), so export one for the runs.
cd "$(dirname "$0")/../../.."  # the repository root
. .venv/bin/activate
export FEDJAX_LM_JOB_SECRET=$(python -c "import secrets; print(secrets.token_hex(16))")
COMMON="--config.mesh.island=2 --config.mesh.data=1 --config.launch.processes=2 --config.log_every=1 --config.checkpoint_every=100000 --config.data.batch_size=4 --config.eval_batches=4 --config.eval_every=25"
J="--jax_cache runs/scale_wan/jax_cache"
W=runs/scale_wan; RATE=1667
python -m experiments.wan --config configs/shakespeare_streaming.py --bandwidth ${RATE}kbit --workdir $W/streaming $J $COMMON --config.total_steps=250 --config.outer.transport=host > $W/streaming.json.txt 2>&1
python -m experiments.wan --config configs/shakespeare_ddp.py --bandwidth ${RATE}kbit --workdir $W/ddp_shaped $J $COMMON --config.total_steps=12 --config.eval_every=12 > $W/ddp_shaped.json.txt 2>&1
echo "1667 done" >> $W/rate.txt
W=runs/scale_wan_2242; RATE=2242
mkdir -p $W; ln -sfn ../scale_wan/ddp_free $W/ddp_free
python -m experiments.wan --config configs/shakespeare_diloco.py --bandwidth ${RATE}kbit --workdir $W/diloco $J $COMMON --config.total_steps=250 --config.outer.learning_rate=0.7 --config.outer.momentum=0.9 > $W/diloco.json.txt 2>&1
python -m experiments.wan --config configs/shakespeare_streaming.py --bandwidth ${RATE}kbit --workdir $W/streaming $J $COMMON --config.total_steps=250 --config.outer.transport=host > $W/streaming.json.txt 2>&1
python -m experiments.wan --config configs/shakespeare_ddp.py --bandwidth ${RATE}kbit --workdir $W/ddp_shaped $J $COMMON --config.total_steps=12 --config.eval_every=12 > $W/ddp_shaped.json.txt 2>&1
echo done > $W/done.txt
