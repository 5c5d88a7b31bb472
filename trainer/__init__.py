"""Metric-learning training, evaluation, the original CLI workflow, and SavedModel export."""
