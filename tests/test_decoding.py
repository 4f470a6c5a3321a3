"""Batched greedy and beam search: checked against the teacher-forced decoder, an exhaustive
enumeration, and each other, compiled (XLA) under TensorFlow and once under JAX."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from keras import ops
from PIL import Image

from caption_pipeline.data.text import SPECIAL_TOKENS, Vocabulary
from caption_pipeline.errors import DataError
from caption_pipeline.model import Captioner, ModelConfig
from caption_pipeline.model.beam_search import (
    END_ID,
    PAD_ID,
    START_ID,
    UNK_ID,
    beam_search,
    greedy_search,
    length_penalty,
)
from caption_pipeline.model.decoding import DecodeSettings, decode_dataset, make_decoder
from caption_pipeline.params import defaults, from_conf

CONFIG = from_conf(
    ModelConfig,
    "model",
    vocab_size=12,
    encoder="compact",
    image_size=32,
    compact_filters=(8, 8),
    compact_pool_last=True,
    embed_dim=8,
    attention_dim=8,
    lstm_units=16,
)
V = CONFIG.vocab_size
MAX_LENGTH = 8


def tiny_captioner(end_bias: float = 0.0, seed: int = 0) -> Captioner:
    """A random Captioner whose decoder weights come from numpy (the same under every backend);
    `end_bias` is the output bias of <end>: with 0, some captions end early and some do not."""
    model = Captioner(CONFIG)
    rng = np.random.default_rng(seed)
    model.decoder.set_weights(
        [rng.normal(0.0, 1.0, w.shape).astype("float32") for w in model.decoder.get_weights()]
    )
    bias = np.array(ops.convert_to_numpy(model.decoder.out_vocab.bias))
    bias[END_ID] = end_bias
    model.decoder.out_vocab.bias.assign(bias)
    return model


def image_features(batch: int, seed: int = 1) -> np.ndarray:
    """[B, R, D] features, with a per-image offset so that images differ after mean pooling."""
    rng = np.random.default_rng(seed)
    shape = (batch, 64, 8)  # the compact encoder's 8x8 grid of 8 channels at 32 px
    return (rng.standard_normal(shape) + 2 * rng.standard_normal((batch, 1, 8))).astype("float32")


def tiny_vocabulary() -> Vocabulary:
    """12 ids, as the tiny model's output: the special tokens and the words a .. h."""
    return Vocabulary(
        (*SPECIAL_TOKENS.values(), *"abcdefgh"),
        {w: 1 for w in "abcdefgh"},
        min_count=1,
        max_caption_length=5,
    )


def numpy_captions(captions):
    return type(captions)(*(ops.convert_to_numpy(x) for x in captions))


def teacher_forced(model, features, ids, lengths):
    """Sum of log p over the first `lengths` tokens of ids [N, L], and the attention [N, L, R]
    (zero after them), computed by the decoder's teacher-forced pass."""
    captions = np.concatenate([np.full((len(ids), 1), START_ID), ids], axis=1).astype("int32")
    logits, alpha = model.teacher_forced(features, captions)
    logp = ops.convert_to_numpy(ops.log_softmax(logits, axis=-1))
    token_logp = np.take_along_axis(logp, ids[..., None].astype("int64"), axis=-1)[..., 0]
    valid = np.arange(ids.shape[1])[None, :] < lengths[:, None]  # [N, L]
    return (token_logp * valid).sum(1), ops.convert_to_numpy(alpha) * valid[..., None]


class StepCounter:
    """A model that counts decoder steps. Uncompiled TensorFlow runs `while_loop` eagerly, in
    Python, so the count is the number of loop iterations."""

    def __init__(self, model):
        self.model, self.steps = model, 0

    def init_state(self, features):
        return self.model.init_state(features)

    def step(self, words, state):
        self.steps += 1
        return self.model.step(words, state)


@pytest.fixture(scope="module")
def model():
    return tiny_captioner()


@pytest.fixture(scope="module")
def features():
    return image_features(4)


@pytest.fixture(scope="module")
def beam3(model, features):
    """Compiled beam search, K = 3, GNMT alpha = 0.7, on 4 images."""
    settings = from_conf(DecodeSettings, "evaluate.decoding", beam_size=3, alpha=0.7)
    return make_decoder(model, settings, MAX_LENGTH)({"features": features})


@pytest.fixture(scope="module")
def greedy(model, features):
    settings = from_conf(DecodeSettings, "evaluate.decoding", method="greedy", alpha=0.7)
    return make_decoder(model, settings, MAX_LENGTH)({"features": features})


def test_beam_size_one_is_greedy(model, features, greedy):
    beam1 = make_decoder(
        model, from_conf(DecodeSettings, "evaluate.decoding", beam_size=1, alpha=0.7), MAX_LENGTH
    )({"features": features})
    assert greedy.ids.shape == (4, 1, MAX_LENGTH)
    # The case is not trivial: captions of several lengths, ended or cut at max_length.
    assert len(set(greedy.lengths.ravel())) > 1 and not greedy.finished.all()
    for field in ("ids", "lengths", "finished"):
        np.testing.assert_array_equal(getattr(beam1, field), getattr(greedy, field))
    np.testing.assert_allclose(beam1.log_probs, greedy.log_probs, rtol=1e-6)
    np.testing.assert_allclose(beam1.scores, greedy.scores, rtol=1e-6)
    np.testing.assert_allclose(beam1.attention, greedy.attention, atol=1e-6)


def test_beams_are_sorted_scored_padded_and_match_teacher_forcing(model, features, beam3, greedy):
    b, k, length = beam3.ids.shape
    assert (b, k, length) == (4, 3, MAX_LENGTH) and beam3.attention.shape == (4, 3, length, 64)
    assert (np.diff(beam3.scores, axis=1) <= 0).all()
    np.testing.assert_allclose(
        beam3.scores, beam3.log_probs / ((5 + beam3.lengths) / 6) ** 0.7, rtol=1e-5
    )
    assert (beam3.scores[:, 0] >= greedy.scores[:, 0] - 1e-5).all()
    ids, lengths = beam3.ids.reshape(b * k, length), beam3.lengths.ravel()
    position = np.arange(length)[None, :]
    last = ids[np.arange(b * k), lengths - 1]
    np.testing.assert_array_equal(beam3.finished.ravel(), last == END_ID)
    assert beam3.finished.any() and not beam3.finished.all()
    assert (ids[position >= lengths[:, None]] == PAD_ID).all()
    words = ids[position < (lengths - beam3.finished.ravel())[:, None]]
    assert (words > START_ID).all() and (words != END_ID).all()
    # The beams' sums and attention maps are what the teacher-forced decoder gives them.
    log_probs, attention = teacher_forced(model, np.repeat(features, k, axis=0), ids, lengths)
    np.testing.assert_allclose(beam3.log_probs.ravel(), log_probs, rtol=1e-5)
    np.testing.assert_allclose(beam3.attention.reshape(b * k, length, -1), attention, atol=1e-5)
    np.testing.assert_allclose(attention.sum(-1), (position < lengths[:, None]), atol=1e-5)


def test_all_beams_ending_early_stop_the_loop():
    model, features = tiny_captioner(end_bias=20.0), image_features(2)
    counter = StepCounter(model)
    beams = numpy_captions(beam_search(counter, features, 3, MAX_LENGTH))
    # <end>, then w <end> twice: every beam has ended after 2 of the 8 steps.
    assert counter.steps == 2
    np.testing.assert_array_equal(beams.lengths, [[1, 2, 2]] * 2)
    assert beams.finished.all() and beams.ids.shape == (2, 3, MAX_LENGTH)
    assert (beams.ids[:, 0, 1:] == PAD_ID).all() and (beams.ids[:, 1:, 2:] == PAD_ID).all()
    assert (beams.attention[:, 0, 1:] == 0).all() and (beams.attention[:, 1:, 2:] == 0).all()

    counter.steps = 0
    captions = numpy_captions(greedy_search(counter, features, MAX_LENGTH))
    assert counter.steps == 1
    np.testing.assert_array_equal(captions.ids[:, 0], [[END_ID] + [PAD_ID] * 7] * 2)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_no_beam_reaching_end_stops_at_max_length(search):
    model, features = tiny_captioner(end_bias=-1e4), image_features(2)
    counter = StepCounter(model)
    run = (
        (lambda: greedy_search(counter, features, 5))
        if search == "greedy"
        else (lambda: beam_search(counter, features, 3, 5))
    )
    captions = numpy_captions(run())
    assert counter.steps == 5 and captions.ids.shape[-1] == 5
    assert (captions.lengths == 5).all() and not captions.finished.any()
    assert (captions.ids > END_ID).all()  # words only: no <pad>, <start> or <end>
    assert (captions.log_probs > -1e3).all()  # <end>'s log p is about -1e4: never taken


class StateSpy(StepCounter):
    """Records the shapes of the state each step receives."""

    def __init__(self, model):
        super().__init__(model)
        self.shapes = set()

    def step(self, words, state):
        self.shapes.add(
            tuple(tuple(x.shape) for x in (words, state.features, state.projected, state.h))
        )
        return super().step(words, state)


def test_searches_hold_each_images_features_once_not_once_per_beam(model, features):
    """The K beams (or samples) of an image share its features and projection: the step gets
    them [B, R, .] with the beams' words and h as [B, K, .], never K copies [B*K, R, .]."""
    from caption_pipeline.model.sampling import sample_captions

    b, r, d = features.shape
    units, attention = CONFIG.lstm_units, CONFIG.attention_dim
    for k, run in [
        (3, lambda spy: beam_search(spy, features, 3, 2)),
        (4, lambda spy: sample_captions(spy, features, np.full((b, 4, 2), 0.5, "float32"))),
    ]:
        spy = StateSpy(model)
        run(spy)
        assert spy.shapes == {((b, k), (b, r, d), (b, r, attention), (b, k, units))}
    spy = StateSpy(model)
    greedy_search(spy, features, 2)  # one caption per image: rows as in training
    assert spy.shapes == {((b,), (b, r, d), (b, r, attention), (b, units))}


def test_an_image_alone_or_repeated_or_among_others_decodes_the_same(model, features, beam3):
    decode = make_decoder(
        model, from_conf(DecodeSettings, "evaluate.decoding", beam_size=3, alpha=0.7), MAX_LENGTH
    )
    alone = decode({"features": features[2:3]})
    repeated = decode({"features": np.repeat(features[2:3], 5, axis=0)})
    for row in range(5):
        np.testing.assert_array_equal(repeated.ids[row], alone.ids[0])
        np.testing.assert_allclose(repeated.log_probs[row], alone.log_probs[0], rtol=1e-5)
        np.testing.assert_allclose(repeated.attention[row], alone.attention[0], atol=1e-5)
    np.testing.assert_array_equal(beam3.ids[2], alone.ids[0])  # among 3 other images
    np.testing.assert_allclose(beam3.log_probs[2], alone.log_probs[0], rtol=1e-5)


def all_captions(max_length: int, allow_unk: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every caption the search may produce: up to max_length tokens, words then <end>, or
    max_length words without one; the words are 4..V-1, and <unk> (3) with `allow_unk`.
    ids [N, max_length], lengths [N]."""
    words = range(UNK_ID if allow_unk else UNK_ID + 1, V)
    ids, lengths = [], []
    for n in range(max_length):
        for prefix in itertools.product(words, repeat=n):
            ids.append([*prefix, END_ID] + [PAD_ID] * (max_length - n - 1))
            lengths.append(n + 1)
    for caption in itertools.product(words, repeat=max_length):
        ids.append(list(caption))
        lengths.append(max_length)
    return np.array(ids, dtype="int32"), np.array(lengths)


@pytest.mark.parametrize("alpha, allow_unk", [(0.0, False), (1.0, False), (0.0, True)])
def test_a_beam_as_wide_as_every_caption_finds_the_exhaustive_ranking(alpha, allow_unk):
    model, features = tiny_captioner(end_bias=1.5), image_features(2, seed=3)
    ids, lengths = all_captions(3, allow_unk)  # 1 + 8 + 64 + 512 = 585 (820 with <unk>)
    beams = numpy_captions(beam_search(model, features, len(ids), 3, alpha, allow_unk=allow_unk))
    for image in range(2):
        log_probs, _ = teacher_forced(
            model, np.repeat(features[image : image + 1], len(ids), 0), ids, lengths
        )
        scores = log_probs / ((5 + lengths) / 6) ** alpha
        order = np.argsort(-scores, kind="stable")
        np.testing.assert_allclose(beams.scores[image], scores[order], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(beams.ids[image, :10], ids[order[:10]])
        np.testing.assert_array_equal(beams.lengths[image, :10], lengths[order[:10]])
    # The best captions have different lengths, so the length normalization matters here.
    assert len(set(beams.lengths[:, :10].ravel())) > 1


def unk_loving_captioner() -> Captioner:
    """A tiny Captioner whose most likely word is <unk> at every step, by far."""
    model = tiny_captioner()
    bias = np.array(ops.convert_to_numpy(model.decoder.out_vocab.bias))
    bias[UNK_ID] = 50.0
    model.decoder.out_vocab.bias.assign(bias)
    return model


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_unk_is_never_generated_unless_allowed(method):
    model, features = unk_loving_captioner(), image_features(3)
    never = make_decoder(
        model, from_conf(DecodeSettings, "evaluate.decoding", method=method), MAX_LENGTH
    )({"features": features})
    assert not (never.ids == UNK_ID).any()
    assert (never.log_probs > -1e3).all()  # real captions of the other words, not dead beams
    allowed = make_decoder(
        model,
        from_conf(DecodeSettings, "evaluate.decoding", method=method, allow_unk=True),
        MAX_LENGTH,
    )({"features": features})
    assert (allowed.ids[:, 0, 0] == UNK_ID).all()  # what the model likes best, when allowed
    with pytest.raises(DataError, match="decoding.allow_unk must be true or false"):
        from_conf(DecodeSettings, "evaluate.decoding", allow_unk="no")


def test_decode_dataset_turns_shards_into_captions(tmp_path, model):
    # Imported here: the reader needs TensorFlow, and the JAX test imports this module without it.
    from caption_pipeline.data.shards.image_writer import write_shards
    from caption_pipeline.data.shards.plan import ImageCaptions, build_shard_plan
    from caption_pipeline.data.shards.reader import ReaderOptions, make_caption_dataset
    from caption_pipeline.data.shards.shard_set import load_shard_set

    rng = np.random.default_rng(0)
    images = []
    for image_id in range(20, 25):
        path = tmp_path / f"{image_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        images.append(ImageCaptions("test", image_id, str(path), [[1, 4, 5, 2]]))
    plan = build_shard_plan(images, num_shards={"test": 1}, seed=0, image_size=32)
    write_shards(plan, tmp_path / "shards", workers=1, progress=False)
    shards = load_shard_set(tmp_path / "shards")
    dataset = make_caption_dataset(shards, "test", batch_size=2)  # batches of 2, 2, 1
    vocabulary = tiny_vocabulary()
    settings = from_conf(
        DecodeSettings,
        "evaluate.decoding",
        beam_size=2,
        alpha=0.5,
        jit_compile=False,
        keep_attention=True,
    )

    decoded = decode_dataset(model, vocabulary, dataset, settings)

    inputs = [x for x, _ in dataset.as_numpy_iterator()]
    image_ids = np.concatenate([x["image_id"] for x in inputs])
    assert sorted(d.image_id for d in decoded) == list(range(20, 25))
    assert [d.image_id for d in decoded] == image_ids.tolist()
    # Same as one batch of all five images through the encoder and the search.
    direct = make_decoder(model, settings, settings.steps(vocabulary))(
        {"image": np.concatenate([x["image"] for x in inputs])}
    )
    assert direct.ids.shape == (5, 2, 6)  # max_caption_length 5 words + <end>
    for b, image in enumerate(decoded):
        assert image.captions == [vocabulary.decode(ids) for ids in direct.ids[b]]
        assert image.caption == image.captions[0]
        assert all(set(c.split()) <= {*"abcdefgh", "<unk>"} for c in image.captions)
        np.testing.assert_allclose(image.scores, direct.scores[b], rtol=1e-5)
        np.testing.assert_array_equal(image.lengths, direct.lengths[b])
        assert image.attention.shape == (2, 6, 64)

    jpegs = make_caption_dataset(
        shards, "test", batch_size=2, options=ReaderOptions(decode_images=False)
    )
    with pytest.raises(DataError, match="'image' holds encoded JPEG"):
        decode_dataset(model, vocabulary, jpegs, settings)


def test_bad_settings_and_batches_are_named(model, features):
    for params, field in [
        ({"method": "sample"}, "decoding.method"),
        ({"beam_size": 0}, "decoding.beam_size"),
        ({"max_length": 0}, "decoding.max_length"),
        ({"alpha": -1.0}, "decoding.alpha"),
        ({"beams": 3}, "unknown key"),
    ]:
        with pytest.raises(DataError, match=field):
            DecodeSettings.from_params({**defaults("evaluate.decoding"), **params})
    vocabulary = tiny_vocabulary()
    with pytest.raises(DataError, match="needs 'image_id'"):
        decode_dataset(
            model,
            vocabulary,
            [{"features": features}],
            from_conf(DecodeSettings, "evaluate.decoding"),
        )


JAX_DECODING = textwrap.dedent("""
    import json, sys
    import keras
    from caption_pipeline.model.decoding import DecodeSettings, make_decoder
    from caption_pipeline.params import from_conf
    sys.path.insert(0, sys.argv[1])
    from test_decoding import MAX_LENGTH, image_features, tiny_captioner

    model, features = tiny_captioner(), {"features": image_features(4)}
    out = {"backend": keras.backend.backend()}
    for name, settings in [("greedy", from_conf(DecodeSettings, "evaluate.decoding",
                                                method="greedy", alpha=0.7)),
                           ("beam1", from_conf(DecodeSettings, "evaluate.decoding",
                                               beam_size=1, alpha=0.7)),
                           ("beam3", from_conf(DecodeSettings, "evaluate.decoding",
                                               beam_size=3, alpha=0.7))]:
        captions = make_decoder(model, settings, MAX_LENGTH)(features)
        out[name] = {"ids": captions.ids.tolist(), "log_probs": captions.log_probs.tolist()}
    out["tensorflow_imported"] = "tensorflow" in sys.modules
    print(json.dumps(out))
""")


def test_jax_backend_decodes_the_same_without_tensorflow(greedy, beam3):
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", JAX_DECODING, str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["backend"] == "jax" and not result["tensorflow_imported"]
    assert result["beam1"]["ids"] == result["greedy"]["ids"]
    np.testing.assert_allclose(
        result["beam1"]["log_probs"], result["greedy"]["log_probs"], rtol=1e-6
    )
    # Same weights, same captions as compiled TensorFlow (the fixtures above).
    np.testing.assert_array_equal(result["greedy"]["ids"], greedy.ids)
    np.testing.assert_array_equal(result["beam3"]["ids"], beam3.ids)
    np.testing.assert_allclose(result["beam3"]["log_probs"], beam3.log_probs, rtol=1e-4)


def test_length_penalty_is_gnmt():
    np.testing.assert_allclose(
        ops.convert_to_numpy(length_penalty(np.array([1, 7]), 1.0)), [1.0, 2.0]
    )
    np.testing.assert_allclose(ops.convert_to_numpy(length_penalty(np.array([3]), 0.0)), [1.0])
