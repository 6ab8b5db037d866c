#!/usr/bin/env bash
# Reproduces the README's results table on this machine: the default run (Glow on the embedded
# digits), the other presets on the same data, and the foundation benchmark (Glow on
# Fashion-MNIST, 600 steps). Prints the summary line of each run; the figures in the README come
# from this script (about an hour on 2 idle cores).
#   bash scripts/reproduce_results.sh FASHION_MNIST_ROOT
#   NFCV_DATA=FASHION_MNIST_ROOT bash scripts/reproduce_results.sh
# FASHION_MNIST_ROOT: the folder of the four original Fashion-MNIST .gz files (or torchvision's
# FashionMNIST/raw/ layout); the argument wins over $NFCV_DATA.
set -euo pipefail
fashion_root=${1:-${NFCV_DATA:-}}
if [[ -z "$fashion_root" ]]; then
  echo "reproduce_results.sh: give the Fashion-MNIST folder as the argument or in NFCV_DATA" >&2
  echo "  usage: bash scripts/reproduce_results.sh FASHION_MNIST_ROOT" >&2
  exit 2
fi
if [[ ! -d "$fashion_root" ]]; then
  echo "reproduce_results.sh: $fashion_root (the Fashion-MNIST folder) does not exist" >&2
  exit 2
fi
echo "== machine: $(nproc) cores, torch threads: $(python3 -c 'import torch; print(torch.get_num_threads())')"
echo "== default run: nfcv-train"
/usr/bin/time -f "wall %e s" nfcv-train trainer.enable_progress_bar=false 2>&1 | grep -E "^nfcv:|wall"
echo "== benchmark: Glow on Fashion-MNIST, 600 steps"
/usr/bin/time -f "wall %e s" nfcv-train experiment=glow_fashion_mnist "data.root=$fashion_root" \
  trainer.enable_progress_bar=false 2>&1 | grep -E "^nfcv:|img/s|wall"
for args in "model=flowpp dequant=variational" "model=flowpp" "model=realnvp" "model=nice" \
  "model.coupling=spline" "model.coupling=naf" "model.permutation=emerging" \
  "model=nice model.linear=full_linear" "model=tarflow" \
  "model=jet" "model=resflow" "dequant=gaussian"; do
  echo "== digits: nfcv-train $args"
  # shellcheck disable=SC2086
  /usr/bin/time -f "wall %e s" nfcv-train $args trainer.enable_progress_bar=false 2>&1 |
    grep -E "^nfcv:|wall"
done
for experiment in tarflow_fashion_mnist jet_fashion_mnist; do
  echo "== benchmark: nfcv-train experiment=$experiment (Fashion-MNIST, 600 steps)"
  /usr/bin/time -f "wall %e s" nfcv-train "experiment=$experiment" "data.root=$fashion_root" \
    trainer.enable_progress_bar=false 2>&1 | grep -E "^nfcv:|img/s|wall"
done
