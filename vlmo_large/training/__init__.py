"""Pretraining: run config, stage objectives, DeepSpeed engine, checkpoints and the loop."""
