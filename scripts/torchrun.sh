#!/usr/bin/env bash
# Run a lightning-prune recipe with torchrun on NNODES nodes x GPUS_PER_NODE processes (docs/distributed.md).
# Start it once on every node, with the same RUN_DIR, MASTER_ADDR and MASTER_PORT and that node's NODE_RANK:
#
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS_PER_NODE=8 RUN_DIR=outputs/r50 scripts/torchrun.sh recipe=imagenet_resnet50_taylor_fo_bn_72
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 GPUS_PER_NODE=8 RUN_DIR=outputs/r50 scripts/torchrun.sh recipe=imagenet_resnet50_taylor_fo_bn_72
#
# One node: `GPUS_PER_NODE=4 scripts/torchrun.sh recipe=...`. CPU only (gloo): add
# `trainer.accelerator=cpu trainer.sync_batchnorm=false`. Lightning sees TorchElasticEnvironment and
# starts no process itself; data.batch_size stays the total batch, split over all processes.
set -euo pipefail

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}"
[ "$GPUS_PER_NODE" -ge 1 ] || GPUS_PER_NODE=1
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
# every process (on every node) must write into the same Hydra run folder: no per-process timestamp
RUN_DIR="${RUN_DIR:-outputs/torchrun/${MASTER_ADDR}-${MASTER_PORT}}"

exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m lightning_prune \
    trainer=ddp trainer.devices="$GPUS_PER_NODE" trainer.num_nodes="$NNODES" \
    hydra.run.dir="$RUN_DIR" "$@"
