"""Serving: the trained captioner out of Python, to the people and programs that use it.

In the order a model goes through it:

- `export.py`: one TensorFlow SavedModel from encoded image bytes to captions, with
  `image_graph.py`'s preprocessing as graph ops; `export_check.py` proves it captions as the
  Python model does before it is registered;
- `inference.py`: captioning images with an export (local folder or MLflow model URI), shared
  by the CLI (`caption_pipeline.__main__`), `server.py` (HTTP and the web page in `static/`)
  and the MLflow pyfunc model;
- `batch_captioning.py`: bulk captioning on Apache Spark, in the session of
  `spark_session.py`.

Imports `data/` and `model/` only.
"""
