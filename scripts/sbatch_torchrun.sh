#!/usr/bin/env bash
# One run on SLURM through torchrun: one SLURM task per node, each starting torchrun with one
# process per GPU of its node; the first node hosts the rendezvous. For sites that prefer
# torchrun to the submitit launcher (hydra/launcher=submitit_slurm, which makes each SLURM task a
# rank itself). Arguments are run.py's; run it from the repository root:
#
#   sbatch --nodes=2 --gpus-per-node=4 --time=24:00:00 scripts/sbatch_torchrun.sh \
#       encoder=vit_b16 finetune=deflect work_dir=work_dirs/vit_b16_deflect resume=true
#   NPROC=2 sbatch --cpus-per-task=2 scripts/sbatch_torchrun.sh device=cpu ...   # CPU: 2 ranks
#
# With work_dir=... resume=true the job can be requeued (preemption, `scontrol requeue`, or the
# --requeue below after a node failure) and continues from checkpoints/last.pt of that folder.
# Environment: NPROC (processes per node; default the node's GPUs, else 1), PYTHON (default
# python), MASTER_PORT (default drawn from the job id).
#SBATCH --job-name=deflect
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail

NPROC=${NPROC:-${SLURM_GPUS_ON_NODE:-1}}
PYTHON=${PYTHON:-python}
MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_JOB_NUM_NODES node(s) x $NPROC process(es), rendezvous $MASTER:$PORT"
srun --ntasks-per-node=1 "$PYTHON" -m torch.distributed.run \
    --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$NPROC" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER:$PORT" --rdzv_id="$SLURM_JOB_ID" \
    run.py "$@"
