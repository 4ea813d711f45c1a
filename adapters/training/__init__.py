"""Training: data parsing and validation, hyperparameters, token encoding, the trainer."""
