"""Training: distributed setup, task (model + loss), loop, checkpoints (internal)."""
