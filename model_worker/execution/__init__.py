"""Execution of the model's layers on this host's kernels, apart from the model math (`model_worker.layers`)."""
