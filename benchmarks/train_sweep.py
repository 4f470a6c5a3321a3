"""The sweep behind the default run's training settings (train.epochs, model.attention_lambda,
the grid): whole `train` pipelines from the project's model inputs, chosen on val.

Each variant overrides some of the parameters the `train` pipeline reads (`model`, `train`,
`fine_tune`, `self_critical`, as `section.key=value`) and runs its nodes
(`pipelines/train/nodes.py`, one per phase) in this process: cross-entropy, then fine-tuning
and SCST as configured, with the checkpoints of every phase under `--out`. Training is
bit-reproducible on one machine (docs/benchmarks.md, "SCST's update made bit-reproducible"), so
one run per variant is the variant's figure there, and the variant of the defaults gives the
val CIDEr of `kedro run`.
For the kept weights it prints the val CIDEr of the `evaluate` pipeline (beam 3, pycocoevalcap;
Java), the best val xent of the cross-entropy phase and SCST's greedy val CIDEr-D per epoch.
Every figure is of the train or val split: this script never reads test
(tests/test_evaluation_protocol.py).

    python benchmarks/train_sweep.py --out OUT \
        --variants ";train.epochs=7;train.epochs=13;model.attention_lambda=0.1"

An empty variant is the defaults. A variant that changes the encoder (the grid:
`model.compact_pool_last=true`) needs model inputs computed by that encoder: run
`kedro run --pipelines=features --params=model.compact_pool_last=true` in a copy of the project
and pass its folder as `--model-inputs`.
Prints one JSON line per variant and, at the end, the variant val prefers.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, scst_sweep.py

import keras  # noqa: E402
from scst_sweep import ROOT, _value, selection_data, val_cider  # noqa: E402

from caption_pipeline.data.text import Vocabulary  # noqa: E402
from caption_pipeline.evaluation.coco_scorer import CocoScorer, require_java  # noqa: E402
from caption_pipeline.evaluation.protocol import (  # noqa: E402
    add_split_argument,
    selection_split,
)
from caption_pipeline.pipelines.train.nodes import (  # noqa: E402
    fine_tune_encoder,
    train_cross_entropy,
    train_self_critical,
)
from caption_pipeline.serving.inference import project_config  # noqa: E402
from caption_pipeline.training.features import load_model_inputs  # noqa: E402

SECTIONS = ("model", "train", "fine_tune", "self_critical")


def apply_variant(params: dict, text: str) -> dict:
    """A copy of `params` with a variant such as "train.epochs=7,model.attention_lambda=0.1"
    set; a section or key the `train` pipeline does not read is a ValueError naming it."""
    params = copy.deepcopy(params)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, value = item.split("=", 1)
        section, _, key = name.strip().partition(".")
        if section not in SECTIONS or key not in params[section]:
            raise ValueError(f"variant {text!r}: {name!r} is not a parameter of the train pipeline")
        params[section][key] = _value(value.strip())
    return params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_split_argument(parser)
    parser.add_argument("--out", required=True, help="checkpoints and results per variant")
    parser.add_argument("--variants", default=";train.epochs=7;train.epochs=13")
    parser.add_argument("--model-inputs", default=str(ROOT / "data/05_model_input/model_inputs"))
    parser.add_argument("--env", default=None, help="Kedro environment of the parameters")
    parser.add_argument(
        "--save", action="store_true", help="keep each variant's captioner in OUT/variant-N"
    )
    args = parser.parse_args(argv)
    args.split = selection_split(args.split, "train_sweep")
    params = project_config(ROOT, args.env, "parameters")
    texts = args.variants.split(";")
    try:  # every variant checked before the first one trains
        variants = {text: apply_variant(params, text) for text in texts}
    except ValueError as error:
        parser.error(str(error))
    with CocoScorer(require_java()) as scorer:
        sweep(args, params, variants, scorer)


def sweep(args: argparse.Namespace, params: dict, variants: dict, scorer: CocoScorer) -> None:
    """Every variant (its text: its parameters), one JSON line each, then the one val prefers."""
    model_inputs = load_model_inputs(args.model_inputs)
    vocabulary, captions, shards, settings = selection_data(params)
    vocab = Vocabulary.from_dict(vocabulary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results = []
    for index, (text, variant) in enumerate(variants.items()):
        for phase in ("train", "fine_tune", "self_critical"):
            variant[phase]["checkpoint_dir"] = str(out / f"variant-{index}" / phase)
            variant[phase]["progress"] = False
        keras.utils.clear_session()
        started = time.perf_counter()
        model, train, fine_tune, self_critical = (variant[section] for section in SECTIONS)
        phases = (train, fine_tune, self_critical)
        captioner, history, _ = train_cross_entropy(model_inputs, vocabulary, model, *phases)
        captioner, _, _ = fine_tune_encoder(captioner, model_inputs, vocabulary, *phases)
        captioner, scst_history, _ = train_self_critical(
            captioner, model_inputs, vocabulary, captions, *phases
        )
        result = {
            "variant": text or "(defaults)",
            "val_beam_cider": val_cider(
                captioner, vocab, shards, captions, settings, scorer, args.split
            ),
            "best_val_xent": round(float(history["val_xent"].min()), 4),
            "xent_epochs": len(history),
            "scst_val_cider": scst_history["val_cider"].round(4).tolist()
            if len(scst_history)
            else [],
            "total_s": round(time.perf_counter() - started, 1),
        }
        if args.save:  # e.g. a cross-entropy model for scst_sweep.py --model
            (out / f"variant-{index}").mkdir(exist_ok=True)
            captioner.save(out / f"variant-{index}" / "captioner.keras")
        print(json.dumps(result), flush=True)
        results.append(result)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    best = max(results, key=lambda r: r["val_beam_cider"])
    print(json.dumps({"chosen_on_val": best["variant"], "val_beam_cider": best["val_beam_cider"]}))


if __name__ == "__main__":
    main()
