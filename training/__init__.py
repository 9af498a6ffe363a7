"""The trainer behind train.py and eval.py: config, distributed setup, the loops, checkpoints and logs."""
