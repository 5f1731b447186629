#!/bin/bash
# One machine's part of a multi-machine run: `accelerate launch` with this machine's rank, machine 0's address and
# NNODES x GPUS_PER_NODE processes in all; the arguments are the program and its own (e.g. -m rlfr.cli train ...).
# slurm-2x8.sbatch runs it on every node through srun (SLURM_NODEID, SLURM_NNODES); by hand, on each machine R:
#   NODE_RANK=R NNODES=2 MAIN_PROCESS_IP=<machine 0> bash configs/launch/node.sh -m rlfr.cli train --config ...
# Settings (environment): ACCELERATE_CONFIG (default configs/accelerate/multi-node-ddp.yaml), GPUS_PER_NODE (8),
# MAIN_PROCESS_PORT (29500), PYTHON (python). docs/multi_node.md.
set -euo pipefail
rank=${SLURM_NODEID:-${NODE_RANK:?set NODE_RANK (the rank of this machine) or run under srun}}
nnodes=${SLURM_NNODES:-${NNODES:?set NNODES (the number of machines) or run under srun}}
per_node=${GPUS_PER_NODE:-8}
exec "${PYTHON:-python}" -m accelerate.commands.launch \
    --config_file "${ACCELERATE_CONFIG:-configs/accelerate/multi-node-ddp.yaml}" \
    --num_machines "$nnodes" --machine_rank "$rank" --num_processes "$((nnodes * per_node))" \
    --main_process_ip "${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP (machine 0s address)}" \
    --main_process_port "${MAIN_PROCESS_PORT:-29500}" \
    "$@"
