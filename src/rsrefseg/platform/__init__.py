"""Config schema, Ray session helpers, MLflow tracking, checkpoints."""
