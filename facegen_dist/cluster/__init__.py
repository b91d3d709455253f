"""Running on a cluster: SLURM jobs (`facegen launch`), submitit (`facegen submit`), preemption, ending ranks."""
