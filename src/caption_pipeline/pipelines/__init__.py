"""The Kedro pipelines, one per stage, each a folder with `nodes.py` (thin nodes over the
domain packages) and `pipeline.py`, found by name by `pipeline_registry`: synthetic -> ingest
-> vocab -> shard -> features -> train -> evaluate -> export, and `caption_batch` on demand."""
