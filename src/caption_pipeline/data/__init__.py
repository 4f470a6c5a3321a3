"""Data: from a raw dataset on disk to the tokenized caption table and the image shards.

In the order the data goes through it:

- `shapes/` and `coco_like/`: datasets the project writes itself (the embedded shapes scenes;
  a small COCO-shaped dataset for tests and rehearsals), in COCO's file layout;
- `caption_files.py` reads and checks a COCO captions JSON or Karpathy's split file;
  `coco_instances.py` the object boxes of an `instances` file;
- `images.py` decodes and checks image bytes (also for the CLI and the server);
- `ingestion.py`: captions and images -> the caption table and the ingestion report;
- `ptb_tokenizer.py` and `text.py`: coco-caption's tokenizer, and the vocabulary;
- `shards/`: the caption table and its images in TFRecord shard sets with a manifest.

Nothing here imports the model, training or anything above them.
"""
