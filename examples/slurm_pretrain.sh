#!/bin/bash
# Pretrain Image GPT on several machines under SLURM: one `accelerate launch` per node (srun), each starting one
# process per GPU; the first node of the job is the main process's machine. The arguments go to examples/pretrain.py:
#   sbatch examples/slurm_pretrain.sh --model_size small --output_dir igpt-s ...
# Change the #SBATCH lines to your cluster (nodes, GPUs, time, partition); CONFIG picks the accelerate config
# (multi_node.yaml: DDP; fsdp_multi_node.yaml; deepspeed_zero2.yaml / deepspeed_zero3.yaml): its machine count, ranks,
# address and process count are overridden here from the job. Run it from the repository root.
#SBATCH --job-name=igpt-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

export CONFIG=${CONFIG:-examples/accelerate_configs/multi_node.yaml}
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}  # keep equal to --gpus-per-node
export MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-8} / GPUS_PER_NODE > 0 ? ${SLURM_CPUS_PER_TASK:-8} / GPUS_PER_NODE : 1 ))}

# Single quotes: SLURM_NODEID is each node's own (0 .. nodes - 1), read on that node. c10d rendezvous waits for
# every node at the main process's address, whichever node starts first.
srun --kill-on-bad-exit=1 bash -c 'exec accelerate launch --config_file "$CONFIG" \
    --num_machines "$SLURM_NNODES" --num_processes $(( SLURM_NNODES * GPUS_PER_NODE )) \
    --machine_rank "$SLURM_NODEID" --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
    --rdzv_backend c10d --same_network \
    examples/pretrain.py "$@"' slurm_pretrain "$@"
