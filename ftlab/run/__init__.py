"""The experiment directory: what a run records so it can be trusted and reproduced."""
