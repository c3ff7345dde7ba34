"""Everything Optuna: study files, search space, sampler, pruner, storage, workers, live display."""
