"""Training and evaluation engine: one Trainer, one Evaluator, distributed and checkpoint helpers."""
