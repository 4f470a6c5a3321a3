"""Which encoder should the embedded "shapes" data set use by default?

(a) NASNetMobile with random weights, frozen (ImageNet weights can't be had offline): its
    features are computed once per image, then only the decoder trains; or
(b) the compact CNN, trained end to end with the decoder.

Measures each encoder's forward time per image on this machine, then a learnability probe:
the same decoder trained for the same number of steps on freshly generated shapes images
(caption_pipeline.data.shapes), scored on held-out images by teacher-forced token accuracy and
cross-entropy. Prints one JSON line.

    python benchmarks/encoder_choice.py [--train 1500 --val 300 --steps 400]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402
from tqdm import tqdm  # noqa: E402

from caption_pipeline.data import shapes  # noqa: E402
from caption_pipeline.data.text import Vocabulary, tokenize  # noqa: E402
from caption_pipeline.evaluation.protocol import add_split_argument, selection_split  # noqa: E402
from caption_pipeline.model import Captioner, ModelConfig, caption_losses  # noqa: E402
from caption_pipeline.params import from_conf  # noqa: E402

MAX_TOKENS = 20
VISUAL_WORDS = {
    *shapes.COLOURS,
    *shapes.SHAPE_WORDS,
    *shapes.SIZE_WORDS,
    "one",
    "two",
    "three",
    "left",
    "right",
    "above",
    "below",
    "over",
    "under",
    "top",
    "bottom",
    "middle",
    "centre",
}


def make_split(split: str, count: int, seed: int):
    """uint8 images [N, 128, 128, 3] and every image's captions as token lists."""
    split = selection_split(split, "encoder_choice")  # with the dataset's seed: its images
    config = from_conf(shapes.ShapesConfig, "synthetic", splits={split: count}, seed=seed)
    images, captions = [], []
    for index in tqdm(range(count), desc=f"generate {split}", unit="image"):
        scene, pixels = shapes.generate_image(config, split, index)
        images.append(pixels)
        captions.append([tokenize(c)[:MAX_TOKENS] for c in scene.captions])
    return np.stack(images), captions


def encode(vocabulary: Vocabulary, captions) -> np.ndarray:
    """[N, K, MAX_TOKENS + 2] int32 ids, padded with 0."""
    ids = np.zeros((len(captions), len(captions[0]), MAX_TOKENS + 2), "int32")
    for i, per_image in enumerate(captions):
        for k, tokens in enumerate(per_image):
            encoded = vocabulary.encode(tokens)
            ids[i, k, : len(encoded)] = encoded
    return ids


def forward_ms_per_image(encoder: keras.Model, images: np.ndarray, repeats: int = 3) -> float:
    batch = images[:32].astype("float32")
    encoder.predict_on_batch(batch)  # compiles
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        encoder.predict_on_batch(batch)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / len(batch)


def train_and_score(
    model: Captioner, x_train, y_train, x_val, y_val, steps, batch, seed, visual_ids: np.ndarray
):
    """Train on random (image, caption) pairs; score every val caption, teacher-forced."""
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    rng = np.random.default_rng(seed)
    key = next(iter(x_train))
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=f"train {model.config.encoder}", unit="step"):
        images = rng.integers(0, len(y_train), batch)
        captions = y_train[images, rng.integers(0, y_train.shape[1], batch)]
        model.train_on_batch({key: x_train[key][images]}, captions)
    train_s = time.perf_counter() - start
    correct = total = xent_sum = visual_correct = visual_total = 0.0
    for first in range(0, len(y_val), batch):
        features = model({key: x_val[key][first : first + batch]}, training=False)
        for k in range(y_val.shape[1]):
            captions = y_val[first : first + batch, k]
            logits, alpha = model.teacher_forced(features, captions)
            targets = captions[:, 1:]
            mask = targets != 0
            predicted = ops.convert_to_numpy(ops.argmax(logits, axis=-1))
            correct += float(((predicted == targets) & mask).sum())
            total += float(mask.sum())
            visual = np.isin(targets, visual_ids)
            visual_correct += float(((predicted == targets) & visual).sum())
            visual_total += float(visual.sum())
            xent, _ = caption_losses(logits, alpha, targets)
            xent_sum += float(xent) * float(mask.sum())
    return {
        "train_s": round(train_s, 1),
        "val_xent": round(xent_sum / total, 4),
        "val_token_accuracy": round(correct / total, 4),
        "val_visual_word_accuracy": round(visual_correct / visual_total, 4),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_split_argument(parser)
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--val", type=int, default=300)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    train_images, train_captions = make_split("train", args.train, args.seed)
    val_images, val_captions = make_split(args.split, args.val, args.seed)
    vocabulary = Vocabulary.build([t for c in train_captions for t in c], 1, MAX_TOKENS)
    y_train, y_val = encode(vocabulary, train_captions), encode(vocabulary, val_captions)
    visual_ids = np.array([vocabulary.token_id(w) for w in VISUAL_WORDS if w in vocabulary.counts])
    result = {
        "backend": keras.backend.backend(),
        "vocab": vocabulary.size,
        "train_images": args.train,
        "val_images": args.val,
        "steps": args.steps,
        "batch": args.batch,
    }
    for name in ("blind", "nasnet_mobile", "compact"):
        keras.utils.set_random_seed(args.seed)
        encoder = "compact" if name == "blind" else name
        # As measured (docs/benchmarks.md): the compact CNN trained end to end, pooled last.
        model = Captioner(
            from_conf(
                ModelConfig,
                "model",
                vocab_size=vocabulary.size,
                encoder=encoder,
                image_size=128,
                encoder_trainable=None,
                compact_pool_last=True,
                attention_dim=128,
            )
        )
        entry = {}
        if name == "blind":  # baseline: the decoder alone, given all-zero features
            shape = (model.regions, model.feature_dim)
            x_train, x_val = (
                {"features": np.zeros((n, *shape), "float16")} for n in (args.train, args.val)
            )
        else:
            forward_ms = forward_ms_per_image(model.encoder, val_images)
            entry = {
                "regions": model.regions,
                "feature_dim": model.feature_dim,
                "encoder_params": model.encoder.count_params(),
                "forward_ms_per_image": round(forward_ms, 2),
            }
            if model.config.trains_encoder:
                x_train, x_val = {"image": train_images}, {"image": val_images}
            else:  # frozen: features once per image, float16, as the features pipeline stores them
                start = time.perf_counter()
                x_train, x_val = (
                    {
                        "features": model.encoder.predict(
                            images.astype("float32"), batch_size=64, verbose=0
                        ).astype("float16")
                    }
                    for images in (train_images, val_images)
                )
                entry["feature_extraction_s"] = round(time.perf_counter() - start, 1)
        entry.update(
            train_and_score(
                model, x_train, y_train, x_val, y_val, args.steps, args.batch, args.seed, visual_ids
            )
        )
        result[name] = entry
    print(json.dumps(result))


if __name__ == "__main__":
    main()
