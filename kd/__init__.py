"""kd: knowledge distillation of image classifiers with Accelerate (one code path for CPU, GPU, multi-GPU and
Slurm). The scripts train_teacher.py and distill.py are its front ends; kd.methods holds the distillation methods,
kd.losses their loss functions. Submodules are imported where used, so `import kd` alone stays cheap."""

__version__ = "0.1.0"
