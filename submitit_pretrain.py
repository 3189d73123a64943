"""Submit main_pretrain.py to SLURM with submitit: every flag of main_pretrain.py plus the SLURM ones.

    python submitit_pretrain.py --nodes 2 --ngpus 8 --partition gpu --job_dir /shared/%j ...(main_pretrain flags)

Preemption and timeouts requeue the job, which resumes at the step where it stopped
(launch/slurm.py). `--local` runs the same job with submitit's local executor.
"""
import main_pretrain
from launch import slurm
from config.cli import run_main

if __name__ == "__main__":
    run_main(lambda: slurm.main(main_pretrain))
