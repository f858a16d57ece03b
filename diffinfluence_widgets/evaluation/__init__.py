"""Evaluation of attributions: LDS and retraining without top influences."""
