"""The glue that runs the pipelines as a project: Kedro's hooks and the DVC stages.

- `hooks.py`: Kedro hooks (input checks, outputs kept to the chief worker, dvc.lock
  recorded after a run);
- `dvc_stages.py`: one DVC stage per pipeline, its deps read from the code with
  `import_graph.py`; `dvc_render.py` writes them as dvc.yaml; `dvc_drift.py` says how the
  committed dvc.yaml differs.

The top of the house: imports the pipelines (`pipeline_registry`) and anything below them.
"""
