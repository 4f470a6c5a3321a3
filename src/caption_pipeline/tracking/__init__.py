"""Tracking: what MLflow keeps of every run, and the model registry.

- `runs.py`: the run around kedro-mlflow's (its name, tags, the data's hash, system metrics,
  a failed run's error) and the metric series the catalog's MLflow datasets log;
- `mlflow_model.py`: the export as a pyfunc model, registered as a new version, and the
  champion gate that promotes it only when its val CIDEr gain is beyond the bootstrap noise.

Imports `serving/` (the export it wraps), `evaluation/bootstrap.py` and `training/cluster.py`
(only the chief worker tracks); the pipelines import it.
"""
