"""One training run: the config -> TrainingArguments mapping, the Trainer, and the stages
of a run (prepare data, build the model, fit, finalize)."""
