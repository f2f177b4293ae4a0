#!/bin/bash
# Real run B: cifar10_resnet56 on the CPU, 2 shared cores, one intra-op thread. Budget: 45 min wall.
# Data: the full JPEG training set (50,000; the stages run a fixed number of steps) and the full test set (10,000).
# Batch 64 (the recipe: 128); lr 0.0025 = the paper's 0.01 at batch 256 scaled linearly to batch 64.
cd /work/main
export OMP_NUM_THREADS=1
exec .venv/bin/lightning-prune recipe=cifar10_resnet56 \
  hydra.run.dir=/tmp/lp_realB/run \
  data.batch_size=64 data.eval_batch_size=500 optimizer.lr=0.0025 \
  pruning.neurons_per_step=40 pruning.curve.samples=500 pruning.curve.every=1 \
  stages.train.max_steps=150 stages.finetune.max_steps=300 \
  trainer.enable_progress_bar=false trainer.log_every_n_steps=1
