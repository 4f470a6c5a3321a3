"""Time of the SCST reward: `cider.CiderD.score` on one batch of sampled captions.

A synthetic corpus (3,000 images x 5 references, 10.5 words on average, Zipf-distributed words
from a vocabulary of `--vocab`) gives the document frequencies; one call scores `--candidates`
captions against 5 references each (160: the shapes batch of 32 images x 5 samples; 320: a
COCO batch of 64 x 5). Prints one JSON line: ms per call, best of `--repeats`.

    .venv/bin/python benchmarks/cider_reward.py --vocab 80
    .venv/bin/python benchmarks/cider_reward.py --vocab 10000 --candidates 320
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from caption_pipeline.training.cider import CiderD


def sentences(rng, count: int, vocab: int) -> list[list[str]]:
    lengths = np.clip(rng.poisson(10.5, count), 3, 25)
    words = rng.zipf(1.3, lengths.sum()) % vocab
    cuts = np.cumsum(lengths)[:-1]
    return [[f"w{w}" for w in part] for part in np.split(words, cuts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--vocab", type=int, default=80)
    parser.add_argument("--candidates", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    refs = sentences(rng, args.images * 5, args.vocab)
    corpus = {i: refs[5 * i : 5 * i + 5] for i in range(args.images)}
    started = time.perf_counter()
    scorer = CiderD(corpus)
    setup = time.perf_counter() - started
    images = rng.integers(0, args.images, args.candidates)
    candidates = sentences(rng, args.candidates, args.vocab)
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        scorer.score(candidates, [corpus[int(i)] for i in images])
        times.append(time.perf_counter() - started)
    print(
        json.dumps(
            {
                "vocab": args.vocab,
                "candidates": args.candidates,
                "df_setup_s": round(setup, 2),
                "first_call_ms": round(1e3 * times[0], 1),
                "cached_call_ms": round(1e3 * min(times[1:]), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
