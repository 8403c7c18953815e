"""Deployment: export formats checked against the checkpoint, and compression (int8, pruning)."""
