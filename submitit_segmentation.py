"""Submit main_segmentation.py to SLURM with submitit: every flag of main_segmentation.py plus the SLURM ones.

    python submitit_segmentation.py --nodes 1 --ngpus 8 --partition gpu --job_dir /shared/%j ...(main_segmentation flags)

Preemption and timeouts requeue the job, which resumes at the iteration where it stopped
(launch/slurm.py). `--local` runs the same job with submitit's local executor.
"""
import main_segmentation
from launch import slurm
from config.cli import run_main

if __name__ == "__main__":
    run_main(lambda: slurm.main(main_segmentation))
