#!/usr/bin/env bash
# One ftlab job over several nodes. Run this same command on every node; each node's ftlab
# starts paddle.distributed.launch with --nnodes/--master, and all ranks write into one run
# dir, which must be on a filesystem every node sees (only global rank 0 writes the run's
# files; each node keeps its workers' logs in <run dir>/logs/).
#
#   MASTER=10.0.0.1:8090 NNODES=2 RUN_DIR=/shared/runs/llama3_dp16 \
#     launch/multinode.sh model=llama3 method=lora parallel=dp8 precision=bf16
#
# MASTER   host:port of the rendezvous (any free port on the first node), same on all nodes
# NNODES   number of nodes
# RUN_DIR  the experiment directory (fixed, so every node uses the same one)
# GPUs per node: CUDA_VISIBLE_DEVICES, or all; parallel.nproc_per_node sets the count.
set -euo pipefail
: "${MASTER:?set MASTER=host:port of the rendezvous master}"
: "${RUN_DIR:?set RUN_DIR to a run dir on a shared filesystem}"
NNODES="${NNODES:-2}"
exec ftlab launch.nnodes="$NNODES" launch.master="$MASTER" hydra.run.dir="$RUN_DIR" "$@"
