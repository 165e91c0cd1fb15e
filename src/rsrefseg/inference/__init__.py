"""Inference: the one forward -> score -> gallery path that training's validation, `evaluate`,
`predict` and the MLflow model share; model replicas for batch inference; tiles of large scenes;
the model-ready Ray Data streams of a config's splits."""
