"""Serving a trained model through MLflow: the pyfunc model file (`mlflow_model.py`)."""
