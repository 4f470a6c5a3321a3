"""Shard sets: captioned images (or their encoder features) in TFRecord files, with a manifest.

One job per module, in the order the data goes through them:

- `plan.py`: which images and captions go into which shard file (`build_shard_plan`, from the
  caption table by `images_from_table`), and each shard's fingerprint: what `plan_shards` returns.
- `records.py`: the record format, one `tf.train.SequenceExample` per image: serialize and
  parse image and feature records, decode a record's JPEG to pixels.
- `shard_set.py`: a shard set on disk: its manifest and `ShardSet`, loading one verified
  (`load_shard_set`), and the resumable writer that any kind of shard goes through
  (`write_shard_set`, `commit_shard`: atomic shards, receipts, manifest written last).
- `image_writer.py`: `write_shards` executes a plan into JPEG image shards on a process pool
  (called by the `write_shards` node, into the folder of the catalog's `shards_folder`).
- `reader.py`: the tf.data reader, `make_caption_dataset` (training) and `make_image_dataset`
  (captioning a split), and `pad_captions`.

`plan.py` and `shard_set.py` do not import TensorFlow; the other three do, at the top. This
file imports nothing, so that importing one module loads only what that module needs.
Feature shards are written by `caption_pipeline.training.features` through
`shard_set.write_shard_set`.
"""
