"""python -m kd.experiment: one YAML file for local runs, studies, sweeps and Slurm (see __main__.py)."""
