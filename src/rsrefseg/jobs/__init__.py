"""One module per job: prepare, train, evaluate, predict, tune, submit."""
