"""Training side: config schema, models, DeepSpeed engine, training loop, checkpoints."""
