"""The field's metric names, in the papers' column order: the one list that the metrics, the
evaluation tables, the sweep tables and the config's selection metric (`tune.metric`) share."""

PR_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
METRIC_NAMES = tuple(f"Pr@{x}" for x in PR_THRESHOLDS) + ("cIoU", "gIoU")
