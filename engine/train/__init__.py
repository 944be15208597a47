"""Training: one loop composed of shared components (checkpointing, evaluation cadence, metrics, control, the optimizer step) and the stages that plug into it."""
