"""The sweep behind the shapes encoder's pretraining settings (parameters_features.yml).

For each variant: pretrain the compact encoder on the train split's object masks
(`caption_pipeline.training.encoder_pretraining`), printing after every epoch the validation
accuracy of
regions mostly covered by an object (shape, colour, size). For two of them, then train the
decoder on the frozen encoder's features and caption the VAL split greedily and with beam 3:
attention localization is printed, and the captions are written as COCO results JSON to
score with the project's scorer (Java needed). Every figure it prints is of the train or val
split: a sweep chooses settings, and a figure used to choose is no longer a test figure, so
this script never reads the test split: the held-out split is `--split` (val by default; train
or val only, `caption_pipeline.evaluation.protocol`), and tests/test_evaluation_protocol.py
checks it:

    python benchmarks/encoder_pretraining_sweep.py --out OUT
    python benchmarks/encoder_pretraining_sweep.py --score OUT/*.json

Needs `kedro run --pipelines=synthetic,ingest,vocab` first (images, instances, vocabulary,
tokenized captions). Backend-portable: it ran under JAX on a lent GPU (KERAS_BACKEND=jax), the
images read with Pillow, no TensorFlow. `--smoke` shrinks everything to check it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from caption_pipeline.data.coco_instances import load_instances
from caption_pipeline.data.text import Vocabulary
from caption_pipeline.evaluation.attention_maps import localization_score
from caption_pipeline.evaluation.protocol import add_split_argument, selection_split
from caption_pipeline.model import ModelConfig
from caption_pipeline.model.decoding import DecodeSettings, decode_dataset
from caption_pipeline.params import from_conf
from caption_pipeline.training.cross_entropy import TrainConfig, build_captioner
from caption_pipeline.training.encoder_pretraining import (
    RegionTargets,
    object_region_accuracy,
    pretraining_model,
    region_loss,
    region_targets,
)

ROOT = Path("data/01_raw/shapes")
CAPTIONS_PER_IMAGE = 5


def load_split(split: str, vocab: Vocabulary, tokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """image ids [N], images float32 [N, 128, 128, 3], caption ids [N, 5, T]."""
    rows = tokens[tokens["split"] == selection_split(split, "encoder_pretraining_sweep")]
    ids = np.array(sorted(rows["image_id"].unique()))
    length = vocab.max_caption_length + 2
    captions = np.zeros((len(ids), CAPTIONS_PER_IMAGE, length), np.int32)
    position = {image_id: k for k, image_id in enumerate(ids)}
    filled = np.zeros(len(ids), int)
    paths = {}
    for row in rows.itertuples():
        k = position[row.image_id]
        paths[k] = row.file_path
        if filled[k] < CAPTIONS_PER_IMAGE:
            encoded = vocab.encode(list(row.tokens))[:length]
            captions[k, filled[k], : len(encoded)] = encoded
            filled[k] += 1
    images = np.stack([np.asarray(Image.open(paths[k]).convert("RGB")) for k in range(len(ids))])
    return ids, images.astype("float32"), captions


def by_group(targets: RegionTargets) -> dict[str, np.ndarray]:
    return {group: targets.values[:, :, s] for group, s in targets.slices().items()}


def pretrain(
    data,
    targets,
    log,
    name,
    epochs=6,
    lr=2e-3,
    momentum=0.9,
    filters=(32, 64, 128, 128),
    object_weight=10.0,
    batch_size=32,
    pool_last=True,
    context=(),
    strided_stem=False,
):
    keras.utils.set_random_seed(42)
    encoder = from_conf(
        ModelConfig,
        "model",
        vocab_size=1,
        image_size=128,
        compact_filters=filters,
        compact_pool_last=pool_last,
        compact_context=context,
        compact_strided_stem=strided_stem,
        feature_projection=None,
    ).build_encoder(None)
    for layer in encoder.layers:  # the variant's BatchNormalization momentum
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum
    model = pretraining_model(encoder, targets["train"])
    steps = int(np.ceil(len(data["train"][0]) / batch_size)) * epochs
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, steps)),
        loss={group: region_loss(object_weight) for group in targets["train"].groups},
    )
    started = time.perf_counter()
    val = by_group(targets["val"])
    val_batches = [
        (data["val"][1][i : i + 100], {g: v[i : i + 100] for g, v in val.items()})
        for i in range(0, len(data["val"][1]), 100)
    ]
    for epoch in range(epochs):
        model.fit(
            data["train"][1], by_group(targets["train"]), batch_size=batch_size, epochs=1, verbose=0
        )
        accuracy = object_region_accuracy(model, val_batches, targets["val"], by="size")
        log(
            name,
            "epoch",
            epoch + 1,
            {k: round(v, 3) for k, v in accuracy.items()},
            f"{time.perf_counter() - started:.0f}s",
        )
    log(name, "shape errors", shape_errors(model, val_batches))
    return encoder


def shape_errors(model, batches) -> dict[str, float]:
    """Of the regions mostly covered by an object, the share whose predicted shape is
    background (the object's edge misplaced) and the share given another shape."""
    counts = np.zeros(3, int)  # right, background, another shape
    for images, truth in batches:
        predicted = np.argmax(model.predict_on_batch(images)["category"], -1)
        true = np.argmax(truth["category"], -1)
        covered = truth["category"][..., 0] < 0.5
        counts += [
            int((covered & (predicted == true)).sum()),
            int((covered & (predicted == 0)).sum()),
            int((covered & (predicted != true) & (predicted != 0)).sum()),
        ]
    return {
        "as background": round(float(counts[1] / counts.sum()), 3),
        "as another shape": round(float(counts[2] / counts.sum()), 3),
    }


def decode_val(data, vocab, encoder, log, name, epochs, out: Path, split, batch_size=32):
    features = {s: np.asarray(encoder.predict(data[s][1], batch_size=100, verbose=0)) for s in data}
    keras.utils.set_random_seed(42)
    model_config = from_conf(
        ModelConfig,
        "model",
        vocab_size=vocab.size,
        encoder="compact",
        encoder_trainable=False,
        attention_dim=128,
    )  # as measured
    train_config = from_conf(TrainConfig, "train", epochs=epochs, batch_size=batch_size)
    steps = int(np.ceil(len(features["train"]) / train_config.batch_size))
    model = build_captioner(model_config, train_config, steps, {"features": features["val"][:2]})
    for epoch in range(epochs):
        history = model.fit(
            {"features": features["train"]},
            data["train"][2],
            batch_size=train_config.batch_size,
            epochs=epoch + 1,
            initial_epoch=epoch,
            verbose=0,
            validation_data=({"features": features["val"]}, data["val"][2]),
        )
        log(name, "decoder epoch", epoch + 1, "val_xent", round(history.history["val_xent"][-1], 4))
    objects = load_instances(ROOT / f"annotations/instances_{selection_split(split)}.json")
    for method in ("greedy", "beam"):
        settings = from_conf(
            DecodeSettings, "evaluate.decoding", method=method, beam_size=3, keep_attention=True
        )
        batches = [
            {"features": features["val"][i : i + 100], "image_id": data["val"][0][i : i + 100]}
            for i in range(0, len(features["val"]), 100)
        ]
        decoded = decode_dataset(model, vocab, batches, settings)
        log(name, method, "localization", localization_score(decoded, objects))
        results = [{"image_id": d.image_id, "caption": d.caption} for d in decoded]
        (out / f"{name}_{method}.json").write_text(json.dumps(results))


def sweep(
    out: Path,
    smoke: bool,
    grid: bool,
    split: str,
    context: bool = False,
    blocks: bool = False,
    only: tuple[str, ...] = (),
) -> None:
    """The variants, each pretrained on train and measured on `split` (the dicts' "val" key:
    the held-out split)."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    vocab = Vocabulary.from_dict(json.loads(Path("data/03_primary/vocabulary.json").read_text()))
    tokens = pd.read_parquet("data/03_primary/tokenized_captions.parquet")
    splits = {"train": "train", "val": selection_split(split)}  # key: the split read
    data = {key: load_split(name, vocab, tokens) for key, name in splits.items()}
    targets = {
        side: {
            key: region_targets(ROOT / f"annotations/instances_{name}.json", 128, side)
            for key, name in splits.items()
        }
        for side in (8, 16)
    }
    if smoke:
        data = {s: tuple(a[:64] for a in arrays) for s, arrays in data.items()}
        targets = {
            side: {
                s: RegionTargets(t.image_ids[:64], t.values[:64], t.groups)
                for s, t in by_split.items()
            }
            for side, by_split in targets.items()
        }
    for key in splits:
        assert (targets[8][key].image_ids == data[key][0]).all()
    log_file = open(out / "sweep.txt", "w")

    def log(*values):
        print(*values, flush=True)
        print(*values, file=log_file, flush=True)

    epochs = 1 if smoke else None
    if context:  # the default 16x16 encoder without and with context blocks (issue 25)
        for name, rates in (("C0_no_context", ()), ("C24_context_2_4", (2, 4))):
            pretrain(data, targets[16], log, name, epochs or 6, pool_last=False, context=rates)
        return
    if blocks:  # one conv per block against two at 32x32 and 16x16, 16x16 grid (issue 25)
        one, two = (32, 64, 128, 128), (32, 64, (96, 128), (128, 128))
        for name, filters, stem, n in (
            ("B1_one_conv_per_block", one, False, 6),
            ("B2_one_conv_strided_stem", one, True, 6),
            ("B3_two_convs_strided_stem", two, True, 6),
            ("B4_two_convs_strided_stem_8_epochs", two, True, 8),
        ):
            if only and not name.startswith(only):
                continue
            pretrain(
                data,
                targets[16],
                log,
                name,
                epochs or n,
                filters=filters,
                pool_last=False,
                strided_stem=stem,
            )
        return
    if grid:  # the default settings on an 8x8 and a 16x16 grid; batch 128 (GPU) for the decoder
        for side, pool_last in ((16, False), (8, True)):
            encoder = pretrain(
                data, targets[side], log, f"G{side}", epochs=epochs or 8, pool_last=pool_last
            )
            decode_val(
                data,
                vocab,
                encoder,
                log,
                f"G{side}_decoder_10",
                epochs or 10,
                out,
                split,
                batch_size=128,
            )
        return
    targets = targets[8]
    pretrain(data, targets, log, "P1_momentum_0.99", epochs=epochs or 6, momentum=0.99)
    pretrain(data, targets, log, "P2_momentum_0.9", epochs=epochs or 6)
    pretrain(data, targets, log, "P3_lr_5e-3", epochs=epochs or 6, lr=5e-3)
    pretrain(data, targets, log, "P5_filters_256", epochs=epochs or 6, filters=(32, 64, 128, 256))
    pretrain(data, targets, log, "P6_object_weight_3", epochs=epochs or 6, object_weight=3.0)
    encoder = pretrain(data, targets, log, "P4_12_epochs", epochs=epochs or 12)
    decode_val(data, vocab, encoder, log, "P4_decoder_15", epochs or 15, out, split)
    encoder = pretrain(data, targets, log, "P2_again", epochs=epochs or 6)
    decode_val(data, vocab, encoder, log, "P2_decoder_8", epochs or 8, out, split)


def score(files: list[str], split: str) -> None:
    import pandas as pd

    from caption_pipeline.evaluation.coco_scorer import CocoScorer
    from caption_pipeline.evaluation.scoring import score_splits

    table = pd.read_parquet("data/02_intermediate/captions.parquet")
    with CocoScorer() as scorer:
        for file in files:
            results = {selection_split(split): json.loads(Path(file).read_text())}
            sections, _ = score_splits(results, table, scorer)
            print(json.dumps({"file": file, split: sections[split]}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_split_argument(parser)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "sweep_out")))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--grid", action="store_true", help="compare the 8x8 and 16x16 grids")
    parser.add_argument(
        "--context", action="store_true", help="the 16x16 encoder without and with context"
    )
    parser.add_argument(
        "--blocks", action="store_true", help="one conv per block against two at 32 and 16 px"
    )
    parser.add_argument(
        "--only", nargs="+", default=(), metavar="NAME", help="--blocks: these variants (B3 ...)"
    )
    parser.add_argument("--score", nargs="+", metavar="RESULTS_JSON")
    args = parser.parse_args(argv)
    if args.score:
        score(args.score, args.split)
    else:
        sweep(
            args.out, args.smoke, args.grid, args.split, args.context, args.blocks, tuple(args.only)
        )


if __name__ == "__main__":
    main()
