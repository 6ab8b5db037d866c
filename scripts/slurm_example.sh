#!/bin/bash
# A sweep of Glow and RealNVP on CIFAR-10 over two learning rates, on a SLURM cluster, through
# Hydra's submitit launcher (configs/hydra/launcher/slurm.yaml). Run it on a login node, from a
# checkout installed with:  pip install -e '.[cluster]'
#
# - Each combination becomes one SLURM job (a job array); each job trains on 1 GPU here. For DDP
#   inside a job set hydra.launcher.tasks_per_node=N, hydra.launcher.gpus_per_node=N and
#   trainer=ddp trainer.devices=N (Lightning reads SLURM's environment).
# - Compute nodes often have no internet: fetch the data once on the login node
#   (python3 scripts/prepare_data.py cifar10 $NFCV_DATA) and point NFCV_DATA at a shared path.
# - resume=auto: a job requeued after a timeout or preemption continues from its run folder's
#   checkpoints/last.ckpt instead of starting over.
# - When the jobs end, the launcher prints the sweep's table; later:
#   python3 scripts/summarize_sweep.py outputs/multirun/<date>/<time>
set -euo pipefail
export NFCV_DATA=${NFCV_DATA:-/shared/datasets}

nfcv-train -m hydra/launcher=slurm \
  hydra.launcher.partition=${PARTITION:-gpu} \
  hydra.launcher.timeout_min=1440 \
  hydra.launcher.gpus_per_node=1 \
  hydra.launcher.cpus_per_task=8 \
  hydra.launcher.mem_gb=64 \
  trainer=gpu data=cifar10 resume=auto \
  model=glow,realnvp optim.optimizer.lr=1e-3,3e-4 \
  trainer.max_steps=100000
