"""The sweep behind the default run's self-critical settings (`self_critical` in
parameters_train.yml): SCST variants from one cross-entropy model, chosen on val.

Each variant starts from the same cross-entropy model (`--model`, e.g. the captioner of
`kedro run --pipelines=train` with `self_critical.enabled: false`) and runs the project's own
SCST phase (`pipelines/train/nodes.self_critical_phase`) on the train split of the project's
model inputs, with the parameters of parameters_train.yml overridden by the variant. After
every epoch it prints the greedy val CIDEr-D that the phase itself uses to pick its epoch,
and the seconds per epoch; for the weights the phase keeps, and for the cross-entropy model,
the val CIDEr of the `evaluate` pipeline (its decoding, beam 3, and pycocoevalcap; Java).
Every figure is of the train or val split: a figure used to choose
is no longer a test figure, so this script never reads test (tests/test_evaluation_protocol.py).

    python benchmarks/scst_sweep.py --model data/06_models/captioner.keras --out OUT \
        --variants "lr=5e-5;lr=2e-4;lr=5e-4;lr=2e-4,baseline=mean" --epochs 4

A variant is `key=value` pairs of the `self_critical` block (`lr` short for learning_rate).
Prints one JSON line per variant and, at the end, the variant and epoch val prefers.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pandas as pd  # noqa: E402

from caption_pipeline.data.shards.shard_set import load_shard_set  # noqa: E402
from caption_pipeline.data.text import Vocabulary  # noqa: E402
from caption_pipeline.evaluation.coco_scorer import CocoScorer, require_java  # noqa: E402
from caption_pipeline.evaluation.protocol import (  # noqa: E402
    SELECTION_SPLITS,
    add_split_argument,
    selection_split,
)
from caption_pipeline.evaluation.scoring import (  # noqa: E402
    EvaluateSettings,
    caption_split,
    coco_results,
    score_splits,
)
from caption_pipeline.pipelines.train.nodes import self_critical_phase  # noqa: E402
from caption_pipeline.serving.inference import project_config  # noqa: E402
from caption_pipeline.training.features import load_model_inputs  # noqa: E402
from caption_pipeline.training.scst import SelfCriticalConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALIASES = {"lr": "learning_rate"}


def _value(text: str):
    """A number if `text` reads as one ("5e-5", which YAML 1.1 leaves a string), else YAML."""
    import yaml

    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return yaml.safe_load(text)


def parse_variant(text: str) -> dict:
    """ "lr=2e-4,baseline=mean" -> {"learning_rate": 2e-4, "baseline": "mean"}."""
    pairs = (item.split("=", 1) for item in text.split(",") if item)
    return {ALIASES.get(key.strip(), key.strip()): _value(value.strip()) for key, value in pairs}


def val_cider(captioner, vocabulary, shards, captions, settings, scorer, split="val") -> float:
    """CIDEr of the held-out `split` (val; never test) as the evaluate pipeline scores it."""
    split = selection_split(split, "scst_sweep")
    results = coco_results(caption_split(captioner, vocabulary, shards, split, settings))
    sections, _ = score_splits({split: results}, captions, scorer)
    return round(sections[split]["CIDEr"], 4)


def selection_data(params: dict) -> tuple[dict, pd.DataFrame, object, EvaluateSettings]:
    """What a sweep reads of the project's finished run: the vocabulary (as stored), the train
    and val captions (never test), the image shards and the evaluate pipeline's settings."""
    vocabulary = json.loads((ROOT / "data/03_primary/vocabulary.json").read_text())
    captions = pd.read_parquet(ROOT / "data/02_intermediate/captions.parquet")
    captions = captions[captions["split"].isin(SELECTION_SPLITS)]  # never test
    shards = load_shard_set(ROOT / "data/03_primary/shards", kind="images")
    return vocabulary, captions, shards, EvaluateSettings.from_params(params["evaluate"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_split_argument(parser)
    parser.add_argument("--model", required=True, help="a cross-entropy captioner (.keras)")
    parser.add_argument("--out", required=True, help="checkpoints and results per variant")
    parser.add_argument("--variants", default="lr=5e-5;lr=2e-4;lr=5e-4")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--env", default=None, help="Kedro environment of the parameters")
    args = parser.parse_args(argv)
    with CocoScorer(require_java()) as scorer:
        sweep(args, scorer)


def sweep(args: argparse.Namespace, scorer: CocoScorer) -> None:
    """Every variant of `args.variants`, one JSON line each, then the one val prefers."""
    params = project_config(ROOT, args.env, "parameters")
    model_inputs = load_model_inputs(ROOT / "data/05_model_input/model_inputs")
    vocabulary, captions, shards, settings = selection_data(params)
    vocabulary = Vocabulary.from_dict(vocabulary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = {
        "model_inputs": model_inputs.manifest.get("fingerprint"),
        "vocabulary": vocabulary.size,
    }

    keras.utils.clear_session()
    cross_entropy = val_cider(
        keras.models.load_model(args.model),
        vocabulary,
        shards,
        captions,
        settings,
        scorer,
        args.split,
    )
    print(json.dumps({"cross_entropy_val_beam_cider": cross_entropy}), flush=True)
    results = []
    for index, text in enumerate(args.variants.split(";")):
        variant = parse_variant(text)
        config = SelfCriticalConfig.from_dict(
            {
                **params["self_critical"],
                **variant,
                "enabled": True,
                "epochs": args.epochs,
                "checkpoint_dir": str(out / f"variant-{index}"),
                "keep_checkpoints": True,
                "progress": False,
            }
        )
        keras.utils.clear_session()
        captioner = keras.models.load_model(args.model)
        started = time.perf_counter()
        kept, history, _ = self_critical_phase(
            captioner, model_inputs, vocabulary, captions, config, fingerprint
        )
        result = {
            "variant": text,
            "val_cider": history["val_cider"].round(4).tolist(),
            "val_beam_cider_kept": val_cider(
                kept, vocabulary, shards, captions, settings, scorer, args.split
            ),
            "seconds_per_epoch": history["seconds"].dropna().round(1).tolist(),
            "total_s": round(time.perf_counter() - started, 1),
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    best = max(results, key=lambda r: max(r["val_cider"]))
    epoch = best["val_cider"].index(max(best["val_cider"]))
    print(
        json.dumps(
            {
                "chosen_on_val": best["variant"],
                "epoch": epoch,
                "val_cider": max(best["val_cider"]),
                "cross_entropy_val_cider": best["val_cider"][0],
                "val_beam_cider": best["val_beam_cider_kept"],
                "cross_entropy_val_beam_cider": cross_entropy,
            }
        )
    )


if __name__ == "__main__":
    main()
