"""Evaluation: scores equal pycocoevalcap's own on the same files, the blind baseline and human
agreement are computed from their inputs, Java is checked first, other model files load, and
the evaluate pipeline's outputs on the smoke project."""

from __future__ import annotations

import dataclasses
import json
import logging
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocotools.coco import COCO

from caption_pipeline.data.text import Vocabulary
from caption_pipeline.errors import DataError
from caption_pipeline.evaluation.coco_scorer import (
    METRICS,
    CocoScorer,
    java_major_version,
    require_java,
    spice_problem,
)
from caption_pipeline.evaluation.scoring import (
    EvaluateSettings,
    captions_from_results,
    leave_one_out_rounds,
    most_frequent_caption,
    references_by_image,
    score_splits,
)
from caption_pipeline.params import defaults
from caption_pipeline.pipelines.evaluate import nodes

# --- hand-made captions -------------------------------------------------------------------------

TRAIN = ["A red circle.", "a red circle", "Two blue squares!", "two blue squares", "A star."]
REFERENCES = {  # split -> image -> raw references, first one first (lowest annotation id)
    "val": {
        11: ["A dog's ball on the grass.", "A ball, lying on grass.", "The ball is RED"],
        12: ["Two cats sleep on a sofa", "two cats on a couch!", "Cats asleep (on a sofa)."],
        13: ["A man riding a horse on a beach.", "someone rides a horse by the sea"],
    },
    "test": {
        21: ["A red circle on the left.", "a red disc at left", "The circle is red."],
        22: ["Two blue squares above a star", "blue squares over a star."],
        23: ["A green star.", "a star that is green", "Green star, on the right!"],
        24: ["A lone yellow hexagon."],  # one reference: no human caption for it
    },
}
GENERATED = {
    "val": {11: "a red ball on the grass", 12: "two cats on a sofa", 13: ""},
    "test": {
        21: "a red circle",
        22: "two blue squares above a star",
        23: "a star",
        24: "a yellow hexagon",
    },
}


def caption_table(train=TRAIN, references=REFERENCES) -> pd.DataFrame:
    rows = [("train", 1000 + k, 100 * (1000 + k), c) for k, c in enumerate(train)]
    rows += [
        (split, image_id, 100 * image_id + k, caption)
        for split, images in references.items()
        for image_id, refs in images.items()
        for k, caption in enumerate(refs)
    ]
    table = pd.DataFrame(rows, columns=["split", "image_id", "annotation_id", "caption"])
    table["file_path"] = "unused.jpg"
    return table.sample(frac=1.0, random_state=0)  # row order must not matter


def results(captions: dict[int, str]) -> list[dict]:
    return [{"image_id": i, "caption": c} for i, c in captions.items()]


def write_coco_files(tmp_path, name, references: dict[int, list[str]], captions: dict[int, str]):
    """A COCO captions annotation file and a results file, as the COCO evaluation server takes."""
    annotations = tmp_path / f"{name}_annotations.json"
    annotations.write_text(
        json.dumps(
            {
                "info": {},
                "licenses": [],
                "type": "captions",
                "images": [{"id": i} for i in references],
                "annotations": [
                    {"id": 100 * i + k, "image_id": i, "caption": c}
                    for i, refs in references.items()
                    for k, c in enumerate(refs)
                ],
            }
        )
    )
    result_file = tmp_path / f"{name}_results.json"
    result_file.write_text(json.dumps(results(captions)))
    return annotations, result_file


@pytest.fixture(scope="module")
def scorer():
    with CocoScorer() as s:
        yield s


@pytest.fixture(scope="module")
def direct_meteor():
    meteor = Meteor()
    yield meteor
    del meteor


def pycocoevalcap_direct(annotations, result_file, meteor):
    """COCOEvalCap.evaluate's steps on the two files (it always adds SPICE, which needs a
    download): pycocotools loads them, PTBTokenizer, then each scorer."""
    coco = COCO(str(annotations))
    coco_results = coco.loadRes(str(result_file))
    ids = coco.getImgIds()
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: coco.imgToAnns[i] for i in ids})
    res = tokenizer.tokenize({i: coco_results.imgToAnns[i] for i in ids})
    overall, per_image = {}, {i: {} for i in ids}
    for scorer, names in [
        (Bleu(4), METRICS[:4]),
        (meteor, ["METEOR"]),
        (Rouge(), ["ROUGE_L"]),
        (Cider(), ["CIDEr"]),
    ]:
        score, scores = scorer.compute_score(gts, res)
        if len(names) == 1:
            score, scores = [score], [scores]
        for name, total, values in zip(names, score, scores, strict=True):
            overall[name] = float(total)
            for i, value in zip(gts, values, strict=True):
                per_image[i][name] = float(value)
    return overall, per_image


@pytest.fixture(scope="module")
def scored(scorer):
    return score_splits(
        {split: results(GENERATED[split]) for split in ("val", "test")}, caption_table(), scorer
    )


# --- scores equal pycocoevalcap's ---------------------------------------------------------------


@pytest.mark.parametrize("split", ["val", "test"])
def test_scores_equal_pycocoevalcap_on_the_same_files(scored, split, tmp_path, direct_meteor):
    sections, table = scored
    annotations, result_file = write_coco_files(
        tmp_path, split, REFERENCES[split], GENERATED[split]
    )
    overall, per_image = pycocoevalcap_direct(annotations, result_file, direct_meteor)
    assert sections[split] == pytest.approx(overall, rel=1e-12, abs=1e-15)
    rows = table[table["split"] == split].set_index("image_id")
    assert rows["caption"].to_dict() == GENERATED[split]
    for image_id, scores in per_image.items():
        assert rows.loc[image_id, list(METRICS)].to_dict() == pytest.approx(scores, abs=1e-12)
    # pycocoevalcap's CIDEr is the mean of the per-image values
    assert rows["CIDEr"].mean() == pytest.approx(sections[split]["CIDEr"])


def test_blind_baseline_is_the_most_frequent_train_caption_scored(scored, tmp_path, direct_meteor):
    sections, _ = scored
    blind = sections["details"]["blind_baseline"]
    # "A red circle." and "a red circle" are one caption after PTB normalization: count 2, tied
    # with "two blue squares" and first in alphabetical order.
    assert (blind["caption"], blind["train_count"]) == ("a red circle", 2)
    test = REFERENCES["test"]
    files = write_coco_files(tmp_path, "blind", test, dict.fromkeys(test, "a red circle"))
    overall, _ = pycocoevalcap_direct(*files, direct_meteor)
    assert sections["blind_baseline"] == pytest.approx(overall, rel=1e-12, abs=1e-15)


def test_blind_baseline_follows_the_train_captions(scored, scorer):
    before, _ = scored
    table = caption_table(train=[*TRAIN, "Two blue squares."])
    after, _ = score_splits({"test": results(GENERATED["test"])}, table, scorer)
    assert after["details"]["blind_baseline"]["caption"] == "two blue squares"
    assert after["details"]["blind_baseline"]["train_count"] == 3
    assert after["blind_baseline"]["CIDEr"] != before["blind_baseline"]["CIDEr"]
    assert after["test"] == before["test"]


def test_most_frequent_caption_ties_and_empty_captions():
    assert most_frequent_caption(["b c", "a b", "B C.", "A b", "..."]) == ("a b", 2)
    with pytest.raises(DataError, match="no train caption"):
        most_frequent_caption(["...", "!"])


def test_human_agreement_and_model_leave_one_out_on_the_same_reduced_references(
    scored, tmp_path, direct_meteor
):
    sections, _ = scored
    several = {i: refs for i, refs in REFERENCES["test"].items() if len(refs) >= 2}
    humans, models = [], []
    for k in range(2):  # images 21..23 have 3, 2 and 3 references: two rounds
        others = {i: refs[:k] + refs[k + 1 :] for i, refs in several.items()}
        human = write_coco_files(
            tmp_path, f"human{k}", others, {i: r[k] for i, r in several.items()}
        )
        humans.append(pycocoevalcap_direct(*human, direct_meteor)[0])
        model = write_coco_files(
            tmp_path, f"model{k}", others, {i: GENERATED["test"][i] for i in several}
        )
        models.append(pycocoevalcap_direct(*model, direct_meteor)[0])
    mean = {name: (humans[0][name] + humans[1][name]) / 2 for name in METRICS}
    assert sections["human"] == pytest.approx(mean, rel=1e-12, abs=1e-15)
    mean = {name: (models[0][name] + models[1][name]) / 2 for name in METRICS}
    assert sections["test_vs_human_refs"] == pytest.approx(mean, rel=1e-12, abs=1e-15)
    assert humans[0]["CIDEr"] != humans[1]["CIDEr"]  # the rounds differ, the mean is of both

    details = sections["details"]["human"]
    assert (details["images"], details["rounds"]) == (3, 2)  # image 24 has a single reference
    assert [r["human"] for r in details["cider_per_round"]] == pytest.approx(
        [h["CIDEr"] for h in humans]
    )
    assert sections["headline"]["cider_vs_human"] == pytest.approx(
        sections["test_vs_human_refs"]["CIDEr"] / sections["human"]["CIDEr"]
    )
    assert sections["headline"]["cider_vs_blind"] == pytest.approx(
        sections["test"]["CIDEr"] / sections["blind_baseline"]["CIDEr"]
    )


def test_every_figure_names_its_split(scored):
    sections, _ = scored
    assert sections["details"]["splits"] == {
        "val": "val",
        "test": "test",
        "blind_baseline": "test",
        "human": "test",
        "test_vs_human_refs": "test",
        "headline": "test",
    }


def test_leave_one_out_rounds_stop_at_the_fewest_references():
    rounds = leave_one_out_rounds({1: ["a", "b", "c"], 2: ["d", "e"], 3: ["f"]})
    assert rounds == [
        ({1: "a", 2: "d"}, {1: ["b", "c"], 2: ["e"]}),
        ({1: "b", 2: "e"}, {1: ["a", "c"], 2: ["d"]}),
    ]
    assert leave_one_out_rounds({1: ["a"]}) == []


def test_human_agreement_follows_the_references(scored, scorer):
    before, _ = scored
    swapped = {**REFERENCES, "test": {i: refs[::-1] for i, refs in REFERENCES["test"].items()}}
    after, _ = score_splits(
        {"test": results(GENERATED["test"])}, caption_table(references=swapped), scorer
    )
    assert after["human"] != before["human"]
    assert after["test"] == pytest.approx(before["test"])  # all references: the same set


def test_no_image_with_two_references_leaves_human_empty_with_a_reason(scorer):
    single = {"test": {i: refs[:1] for i, refs in REFERENCES["test"].items()}}
    sections, _ = score_splits(
        {"test": results(GENERATED["test"])}, caption_table(references=single), scorer
    )
    assert sections["human"] is None and sections["test_vs_human_refs"] is None
    assert sections["headline"] is None
    assert "two or more reference" in sections["details"]["human"]["reason"]


# --- bad input ----------------------------------------------------------------------------------


def test_results_are_checked_entry_by_entry(scorer):
    twice = [{"image_id": 11, "caption": "a"}, {"image_id": 11, "caption": "b"}]
    with pytest.raises(DataError, match="caption_results_val: entry 1: image_id 11 is listed"):
        captions_from_results(twice, "caption_results_val")
    with pytest.raises(DataError, match="results.json: expected a list"):
        captions_from_results({"image_id": 1, "caption": "x"}, "results.json")
    with pytest.raises(DataError, match="entry 0: field 'caption' must be a string"):
        captions_from_results([{"image_id": 1}], "results.json")
    with pytest.raises(DataError, match="entry 0: field 'image_id' must be an integer"):
        captions_from_results([{"image_id": "1", "caption": "x"}], "results.json")
    with pytest.raises(DataError, match="caption_results_val: image_id 99 has no reference"):
        score_splits({"val": results({**GENERATED["val"], 99: "x"})}, caption_table(), scorer)


def test_references_are_raw_captions_in_annotation_order():
    refs = references_by_image(caption_table(), "val")
    assert refs == REFERENCES["val"]
    with pytest.raises(DataError, match="caption_table: missing column"):
        references_by_image(caption_table().drop(columns="annotation_id"), "val")
    with pytest.raises(DataError, match="no captions of split 'test'"):
        references_by_image(caption_table().query("split != 'test'"), "test")


def test_settings_name_bad_keys():
    base = defaults("evaluate")
    settings = EvaluateSettings.from_params(
        {**base, "decoding": {**base["decoding"], "method": "greedy"}, "batch_size": 4}
    )
    assert settings.decoding.method == "greedy"
    with pytest.raises(DataError, match=r"parameters evaluate\.beam \(.*\): unknown key; known"):
        EvaluateSettings.from_params({**base, "beam": 3})
    with pytest.raises(DataError, match="evaluate.batch_size"):
        EvaluateSettings.from_params({**base, "batch_size": 0})
    with pytest.raises(DataError, match=r"evaluate\.decoding\.beams .*unknown key"):
        EvaluateSettings.from_params({**base, "decoding": {**base["decoding"], "beams": 2}})
    with pytest.raises(
        DataError,
        match=r"evaluate\.decoding: missing; it belongs in "
        r"conf/base/parameters_evaluate\.yml",
    ):
        EvaluateSettings.from_params({k: v for k, v in base.items() if k != "decoding"})


# --- Java ---------------------------------------------------------------------------------------


def test_missing_java_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a folder without java
    with pytest.raises(DataError, match="apt-get install default-jre-headless"):
        require_java()
    # Both nodes that need Java check it first, before loading or decoding anything.
    with pytest.raises(DataError, match="`java` is not on PATH"):
        nodes.generate_captions(None, None, None, {}, {})
    with pytest.raises(DataError, match="`java` is not on PATH"):
        nodes.score_captions([], [], pd.DataFrame())


def test_a_java_that_does_not_run_is_reported(monkeypatch, tmp_path):
    java = tmp_path / "java"
    java.write_text("#!/bin/sh\necho 'no Java runtime present' >&2\nexit 1\n")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError, match="failed .no Java runtime present.*apt-get install"):
        require_java()


def test_java_versions_and_spice_availability():
    assert java_major_version('openjdk version "1.8.0_392"') == 8
    assert java_major_version('openjdk version "17.0.15" 2025-04-15') == 17
    assert java_major_version('java version "21" 2023-09-19') == 21
    assert java_major_version("nonsense") is None
    version = require_java()
    assert java_major_version(version) is not None
    # No CoreNLP 3.6.0 jars in this environment (a download): SPICE says why it is skipped.
    problem = spice_problem(version)
    assert "stanford-corenlp-3.6.0.jar" in problem and "Java 8" in problem


# --- the evaluate pipeline on the smoke project -------------------------------------------------


@pytest.mark.slow
def test_evaluate_outputs_of_the_smoke_run(smoke_project):
    data = smoke_project / "data"
    table = pd.read_parquet(data / "02_intermediate" / "captions.parquet")
    vocab = json.loads((data / "03_primary" / "vocabulary.json").read_text())
    metrics = json.loads((data / "08_reporting" / "metrics.json").read_text())

    for section in ("val", "test", "test_vs_human_refs", "human", "blind_baseline"):
        assert list(metrics[section]) == list(METRICS)
        assert all(0.0 <= value <= 10.0 for value in metrics[section].values())
    assert metrics["decoding"] == {
        "method": "beam",
        "beam_size": 3,
        "alpha": 0.0,
        "max_length": vocab["max_caption_length"] + 1,
    }
    # Shapes data: localization is a number, or null with a reason (no shape word written).
    localization = metrics["details"]["attention_localization"]
    assert localization["instances"].endswith("instances_test.json")
    if metrics["attention_localization"] is None:
        assert localization["reason"] and metrics["attention_localization_uniform"] is None
    else:
        assert 0.0 <= metrics["attention_localization"] <= 1.0
    assert metrics["human"]["CIDEr"] > metrics["blind_baseline"]["CIDEr"]
    assert metrics["details"]["model"] == "data/06_models/captioner.keras"  # the trained one
    from caption_pipeline.datasets import CaptionerFileDataset

    trained = CaptionerFileDataset(filepath=str(smoke_project / metrics["details"]["model"]))
    assert metrics["details"]["model_weights"] == trained.load().weights_digest

    scores = pd.read_csv(data / "08_reporting" / "caption_scores.csv", keep_default_na=False)
    assert list(scores.columns) == ["image_id", "split", "caption", *METRICS]
    for split in ("val", "test"):
        entries = json.loads((data / "07_model_output" / f"captions_{split}.json").read_text())
        assert all(
            set(e) == {"image_id", "caption"}
            and isinstance(e["image_id"], int)
            and isinstance(e["caption"], str)
            for e in entries
        )
        ids = sorted(table.loc[table["split"] == split, "image_id"].unique())
        assert [e["image_id"] for e in entries] == ids
        rows = scores[scores["split"] == split]
        assert rows["image_id"].tolist() == ids
        assert rows["caption"].tolist() == [e["caption"] for e in entries]
        assert rows["CIDEr"].mean() == pytest.approx(metrics[split]["CIDEr"])

    pngs = sorted((data / "08_reporting" / "attention").glob("*.png"))
    test_ids = sorted(table.loc[table["split"] == "test", "image_id"].unique())
    assert [p.stem for p in pngs] == [str(i) for i in test_ids[:2]]  # conf/smoke: 2 samples
    assert all(Image.open(p).format == "PNG" for p in pngs)


@pytest.mark.slow
def test_another_model_file_writing_shape_words(smoke_project, tmp_path, monkeypatch):
    """`captioner@evaluated` on another .keras file: the smoke model made to name shapes (it never
    ends, and shape words get a bonus), so that localization is scored on real boxes."""
    import keras

    from caption_pipeline.data.shapes import SHAPE_WORDS
    from caption_pipeline.data.shards.shard_set import load_shard_set
    from caption_pipeline.datasets import CaptionerFileDataset, KerasModelDataset
    from caption_pipeline.training.features import load_model_inputs

    monkeypatch.chdir(smoke_project)  # the catalog's paths are relative to the project
    vocabulary = json.loads(Path("data/03_primary/vocabulary.json").read_text())
    model = KerasModelDataset(filepath="data/06_models/captioner.keras").load()
    bias = np.array(keras.ops.convert_to_numpy(model.decoder.out_vocab.bias))
    bias[Vocabulary.end_id] = -1e4
    bias[[i for i, t in enumerate(vocabulary["tokens"]) if t in SHAPE_WORDS]] += 5.0
    model.decoder.out_vocab.bias.assign(bias)
    model.save(tmp_path / "shapes.keras")

    shards = load_shard_set("data/03_primary/shards")
    model_inputs = load_model_inputs("data/05_model_input/model_inputs")
    base = defaults("evaluate")
    params = {
        **base,
        "batch_size": 10,
        "decoding": {**base["decoding"], "method": "greedy"},
        "attention_samples": 2,
    }
    evaluated = CaptionerFileDataset(filepath=str(tmp_path / "shapes.keras")).load()
    captions, source = nodes.generate_captions(evaluated, shards, model_inputs, vocabulary, params)
    assert source == {
        "model": str(tmp_path / "shapes.keras"),
        "model_weights": evaluated.weights_digest,
    }
    assert [len(captions[s]) for s in ("val", "test")] == [
        shards.num_images(s) for s in ("val", "test")
    ]
    test = sorted(captions["test"], key=lambda d: d.image_id)
    assert all(d.attention is not None for d in test)
    assert all(d.caption and set(d.caption.split()) & set(SHAPE_WORDS) for d in test)

    raw_dataset = json.loads(Path("data/01_raw/raw_dataset.json").read_text())
    result = nodes.localize_attention(captions, raw_dataset)
    assert 0.0 <= result["score"] <= 1.0 and result["images"] == len(test)
    # The uniform baseline, recomputed from the captions and the instances file.
    instances = json.loads(Path(result["instances"]).read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    sizes = {i["id"]: (i["height"], i["width"]) for i in instances["images"]}
    fractions = []
    for image in test:
        height, width = sizes[image.image_id]
        ys, xs = np.mgrid[0:height, 0:width] + 0.5
        for word in image.caption.split():
            if word in SHAPE_WORDS:
                covered = np.zeros((height, width), bool)
                for a in instances["annotations"]:
                    x, y, w, h = a["bbox"]
                    if (
                        a["image_id"] == image.image_id
                        and names[a["category_id"]] == SHAPE_WORDS[word]
                    ):
                        covered |= (xs >= x) & (xs < x + w) & (ys >= y) & (ys < y + h)
                fractions.append(covered.mean())
    assert result["object_words"] == len(fractions)
    assert result["uniform"] == pytest.approx(np.mean(fractions))

    table = pd.read_parquet("data/02_intermediate/captions.parquet")
    figures = nodes.plot_attention(captions, table, params)
    assert list(figures) == [str(d.image_id) for d in test[:2]]
    for image, figure in zip(test, figures.values(), strict=False):
        titles = [ax.get_title() for ax in figure.axes if ax.images]
        assert titles == ["image", *image.caption.split()]


@pytest.mark.slow
def test_stored_features_give_the_captions_and_scores_of_the_images(smoke_project, caplog):
    """The smoke run's decoder joined with the frozen encoder that computed its features (its own
    encoder was fine-tuned since, so the run decoded images), evaluated from the stored float16
    features and from the images through that encoder (float32).

    Tolerance: float16 rounds each feature by at most 2^-11 of it, which can flip the search
    only where two words or beams are within that of each other: at least 95 % of the captions
    must be identical (the default run's 600 val and test images: all are, docs/benchmarks.md).
    CIDEr-D scores an image by its caption and its own references alone (document frequencies
    come from the references), so an image with the same caption scores the same, and the
    split's CIDEr may move only by the differing images' share, each at most 10 (CIDEr-D's
    scale)."""
    from caption_pipeline.data.shards.shard_set import load_shard_set
    from caption_pipeline.datasets import CaptionerFileDataset
    from caption_pipeline.datasets.captioner_file import EvaluatedModel
    from caption_pipeline.model import Captioner
    from caption_pipeline.training.features import feature_encoder_weights, load_model_inputs

    data = smoke_project / "data"
    trained = CaptionerFileDataset(filepath=str(data / "06_models/captioner.keras")).load()
    model_inputs = load_model_inputs(data / "05_model_input/model_inputs")
    shards = load_shard_set(data / "03_primary/shards")
    config = dataclasses.replace(trained.captioner.config, encoder_trainable=False)
    decoder = Captioner(config, feature_shape=model_inputs.feature_shape)
    decoder.decoder.set_weights(trained.captioner.decoder.get_weights())
    frozen = EvaluatedModel(
        decoder.with_encoder(feature_encoder_weights(model_inputs, config)), "frozen"
    )
    vocabulary = json.loads((data / "03_primary/vocabulary.json").read_text())
    table = pd.read_parquet(data / "02_intermediate/captions.parquet")
    params = {**defaults("evaluate"), "attention_samples": 2}

    captions, scores, tables = {}, {}, {}
    for path, inputs, line in (
        ("features", model_inputs, "Decoding the stored features in"),
        ("images", shards, "Decoding the images in"),
    ):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="caption_pipeline.evaluation.scoring"):
            decoded, _ = nodes.generate_captions(frozen, shards, inputs, vocabulary, params)
        assert line in caplog.text
        val, test = nodes.write_results(decoded)
        captions[path] = {"val": val, "test": test}
        scores[path], tables[path] = nodes.score_captions(val, test, table)

    for split in ("val", "test"):
        features, images = (
            {r["image_id"]: r["caption"] for r in captions[path][split]}
            for path in ("features", "images")
        )
        assert list(features) == list(images)
        differing = {i for i in images if features[i] != images[i]}
        assert len(differing) <= 0.05 * len(images), differing
        same = [
            t[(t["split"] == split) & ~t["image_id"].isin(differing)].reset_index(drop=True)
            for t in (tables["features"], tables["images"])
        ]
        pd.testing.assert_frame_equal(*same)  # same caption, same per-image scores
        cider = [scores[path][split]["CIDEr"] for path in ("features", "images")]
        assert abs(cider[0] - cider[1]) <= 10 * len(differing) / len(images) + 1e-9


@pytest.mark.slow
def test_image_reader_gives_each_test_image_once(smoke_project):
    from caption_pipeline.data.shards.reader import make_image_dataset
    from caption_pipeline.data.shards.shard_set import load_shard_set

    shards = load_shard_set(smoke_project / "data" / "03_primary" / "shards")
    ids, shapes = [], set()
    for batch in make_image_dataset(shards, "test", batch_size=5, image_size=64):
        ids += batch["image_id"].numpy().tolist()
        shapes.add(tuple(batch["image"].shape[1:]))
        assert (
            0.0
            <= float(batch["image"].numpy().min())
            <= float(batch["image"].numpy().max())
            <= 255.0
        )
    table = pd.read_parquet(smoke_project / "data" / "02_intermediate" / "captions.parquet")
    assert sorted(ids) == sorted(table.loc[table["split"] == "test", "image_id"].unique())
    assert shapes == {(64, 64, 3)}
