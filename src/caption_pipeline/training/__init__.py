"""Training: from shards to a trained captioner, in three phases, each resumable after kill -9.

In the order a run goes through it:

- `features.py`: the model's inputs, the frozen encoder's region features stored as shards
  (or the image shards themselves); `projection.py` fits the features' fixed linear projection;
  `encoder_pretraining.py` pretrains the compact encoder on the shapes' object masks;
- `cross_entropy.py`: the first phase, teacher-forced cross-entropy with `fit`;
- `fine_tuning.py`: the second, the encoder trained end to end at its own learning rate;
- `scst.py`: the third, self-critical sequence training, with `cider.py`'s CIDEr-D as reward;
- beside every phase: `checkpoints.py` (atomic, kill -9 safe), `devices.py` (the accelerators
  and the precision), `distributed.py` (tf.distribute strategies) and `cluster.py` (which
  task of a multi-worker cluster this process is, without importing Keras).

Imports `data/` and `model/`; nothing in evaluation, serving or the MLOps glue.
"""
