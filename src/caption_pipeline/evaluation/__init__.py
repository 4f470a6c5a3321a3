"""Evaluation: a trained captioner's captions of a split, scored as the COCO leaderboard does.

- `protocol.py`: what may be chosen on which split (train or val; the test split is decoded
  and scored once per run, and only reported);
- `scoring.py`: decode a split with beam search and score it (`coco_scorer.py`:
  pycocoevalcap's BLEU, METEOR, ROUGE-L, CIDEr-D), with the human and blind baselines;
- `attention_maps.py`: word-by-word attention figures and how often attention falls on the
  object a word names (`category_words.py`, with the boxes of `data/coco_instances.py`);
- `bootstrap.py`: paired bootstrap intervals, for the model registry's champion gate.

Imports `data/`, `model/` and `training/` (the stored encoder of the features).
"""
