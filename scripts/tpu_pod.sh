#!/bin/bash
# A study or sweep on a Cloud TPU pod slice (several hosts): the same command on every host.
#
#   scripts/tpu_pod.sh TPU_NAME ZONE configs/two_hop.py /mnt/shared/runs/two_hop
#   scripts/tpu_pod.sh TPU_NAME ZONE configs/sweep_rank.py /mnt/shared/runs/sweep_rank
#
# Every host runs one JAX process of one job: `--distributed=on` makes experiments.run call
# jax.distributed.initialize(), which finds the coordinator and the process ids from the TPU
# metadata; training is data parallel over every chip of the slice, and process 0 writes the
# results and the report. Expects on every host: this repository at ~/lora-limits with
# `make install` done and `.venv/bin/pip install "jax[tpu]==<the installed jax>"`, and the
# workdir on a filesystem all hosts mount at the same path (Filestore/NFS; orbax saves each
# checkpoint from all hosts into it). Extra arguments go to experiments.run; for several
# slices, start one per slice with --shard_index=i --num_shards=n into the same workdir.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: scripts/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
EXTRA=""
if [ $# -gt 0 ]; then EXTRA=$(printf ' %q' "$@"); fi
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="\
cd ~/lora-limits && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python -m experiments.run \
--config=$(printf %q "$CONFIG") --workdir=$(printf %q "$WORKDIR") --distributed=on$EXTRA"
