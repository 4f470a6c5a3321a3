"""Attention maps: upsampling geometry, the localization score and its uniform baseline on
hand-made attention and boxes (and on files of the real shapes generator, and a COCO 2017
instances file), the words that name each category, and the figures."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from caption_pipeline.data import coco_like
from caption_pipeline.data.coco_instances import instances_file, load_instances
from caption_pipeline.data.shapes import CATEGORIES as SHAPES_CATEGORIES
from caption_pipeline.data.shapes import SHAPE_WORDS, SHAPES, ShapesConfig, ensure_generated
from caption_pipeline.errors import DataError
from caption_pipeline.evaluation.attention_maps import (
    attention_figure,
    attention_localization,
    attention_peak,
    box_union_fraction,
    grid_side,
    localization_score,
    upsample_attention,
    word_attention,
)
from caption_pipeline.evaluation.category_words import (
    CATEGORY_WORDS,
    COCO_CATEGORY_WORDS,
    SHAPES_CATEGORY_WORDS,
    CategoryWords,
)
from caption_pipeline.model.decoding import CaptionedImage
from caption_pipeline.params import from_conf

G = 4  # attention grid side in the hand-made cases: R = 16


def one_hot(row: int, col: int, side: int = G) -> np.ndarray:
    alpha = np.zeros(side * side, np.float32)
    alpha[row * side + col] = 1.0  # row-major, as the encoder's Reshape lays regions out
    return alpha


def decoded(image_id: int, caption: str, rows: list[np.ndarray]) -> CaptionedImage:
    """A beam-search result: the best caption's attention rows, then <end>'s, then a worse beam."""
    steps = np.stack([*rows, np.full(rows[0].shape, 1.0 / rows[0].size, np.float32)])
    attention = np.stack([steps, np.zeros_like(steps)])  # [K=2, L, R]
    return CaptionedImage(
        image_id,
        [caption, "other"],
        [0.0, -1.0],
        [0.0, -1.0],
        [len(rows) + 1, 2],
        [True, True],
        attention,
    )


@pytest.mark.parametrize(("height", "width"), [(40, 40), (30, 60)])
def test_a_cell_upsamples_to_its_own_part_of_the_image(height, width):
    heatmap = upsample_attention(one_hot(1, 2), height, width)
    assert heatmap.shape == (height, width)
    x, y = attention_peak(heatmap)
    # Cell (row 1, col 2) of 4 x 4 covers rows [1/4, 2/4) and columns [2/4, 3/4) of the image.
    assert 2 * width / 4 <= x < 3 * width / 4
    assert height / 4 <= y < 2 * height / 4
    # Smooth: the peak spreads to the neighbouring cells, it does not stop at the cell's edge.
    assert 0 < heatmap[int(y), int(x) + width // 4] < heatmap.max()


def test_uniform_attention_stays_uniform_and_sums_are_kept_in_scale():
    heatmap = upsample_attention(np.full(G * G, 1.0 / G**2), 33, 47)
    np.testing.assert_allclose(heatmap, 1.0 / G**2, rtol=1e-12)


def test_attention_that_is_not_a_square_grid_is_refused():
    assert grid_side(121) == 11
    with pytest.raises(DataError, match="15 regions"):
        upsample_attention(np.ones(15), 10, 10)


def test_union_of_boxes_counts_overlaps_once():
    # 10 x 10 and 10 x 20 boxes overlapping in a 10 x 5 strip, in a 40 x 40 image.
    assert box_union_fraction([(0, 0, 10, 10), (5, 0, 10, 20)], 40, 40) == (100 + 200 - 50) / 1600
    assert box_union_fraction([], 40, 40) == 0.0


SCENE = {
    "images": [{"id": 7, "width": 40, "height": 40, "file_name": "7.jpg"}],
    "categories": [
        {"id": 1, "name": "circle"},
        {"id": 2, "name": "square"},
        {"id": 3, "name": "star"},
    ],
    "annotations": [
        {"id": 1, "image_id": 7, "category_id": 1, "bbox": [20, 10, 10, 10]},  # in cell (1, 2)
        {"id": 2, "image_id": 7, "category_id": 2, "bbox": [0, 30, 40, 10]},  # bottom row
    ],
}


@pytest.fixture
def scene_file(tmp_path):
    path = tmp_path / "instances_test.json"
    path.write_text(json.dumps(SCENE))
    return path


def test_peak_inside_the_named_shape_scores_one_outside_zero(scene_file):
    objects = load_instances(scene_file)
    inside = localization_score([decoded(7, "circle", [one_hot(1, 2)])], objects)
    assert (inside["score"], inside["hits"], inside["object_words"]) == (1.0, 1, 1)
    outside = localization_score([decoded(7, "circle", [one_hot(3, 0)])], objects)
    assert outside["score"] == 0.0
    # Looking at the square while saying "circle" is a miss too.
    wrong_shape = localization_score([decoded(7, "circle", [one_hot(3, 3)])], objects)
    assert wrong_shape["score"] == 0.0
    # Uniform baseline: the circle's box is 100 of 1600 pixels.
    assert inside["uniform"] == outside["uniform"] == 100 / 1600


def test_score_averages_over_shape_words_only(scene_file):
    caption = "a big circle and two squares and a star"
    rows = [one_hot(0, 0)] * 9
    rows[2] = one_hot(1, 2)  # "circle": on the circle
    rows[5] = one_hot(0, 0)  # "squares": top left, not on the bottom strip
    result = localization_score(
        [decoded(7, caption, rows), decoded(8, "circle", rows[:1])], load_instances(scene_file)
    )
    # circle hit, squares miss, star names a shape the image does not have: a miss.
    assert result["object_words"] == 3 and result["hits"] == 1
    assert result["score"] == pytest.approx(1 / 3)
    assert result["uniform"] == pytest.approx((100 / 1600 + 400 / 1600 + 0.0) / 3)
    assert result["words_naming_an_absent_object"] == 1
    assert result["images"] == 1  # image 8 has no boxes: left out


def test_no_shape_word_gives_no_score(scene_file):
    result = localization_score(
        [decoded(7, "a red thing", [one_hot(0, 0)] * 3)], load_instances(scene_file)
    )
    assert result["score"] is None and result["uniform"] is None


def test_words_line_up_with_their_decoding_steps():
    rows = [one_hot(0, 0), one_hot(1, 1), one_hot(2, 2)]
    words = word_attention(decoded(1, "a <unk> circle", rows))
    assert [w for w, _ in words] == ["a", "<unk>", "circle"]
    assert all(np.array_equal(alpha, row) for (_, alpha), row in zip(words, rows, strict=True))
    assert word_attention(decoded(1, "", [one_hot(0, 0)])) == []


def test_bad_instances_file_names_file_and_field(tmp_path):
    path = tmp_path / "instances.json"
    bad = json.loads(json.dumps(SCENE))
    bad["annotations"][1]["bbox"] = [0, 30, 40]
    path.write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"instances.json: annotations\[1\]: field 'bbox'"):
        load_instances(path)
    del bad["annotations"][1]["bbox"]
    path.write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"annotations\[1\]: needs field 'bbox'"):
        load_instances(path)
    bad["annotations"][1]["segmentation"] = {"counts": "abc", "size": [40, 40]}  # a mask
    path.write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"annotations\[1\]: needs field 'bbox'"):
        load_instances(path)
    path.write_text("{")
    with pytest.raises(DataError, match="instances.json: not a readable JSON"):
        load_instances(path)


def test_localization_on_real_shapes_files(tmp_path):
    """Attention aimed at each object's box centre (from the generator's instances file) hits."""
    dataset = {
        "name": "shapes",
        "format": "coco",
        "root": str(tmp_path / "shapes"),
        "splits": {"test": {"annotations": "annotations/captions_test.json", "images": "test"}},
    }
    ensure_generated(
        dataset, from_conf(ShapesConfig, "synthetic", splits={"test": 4}, image_size=64)
    )
    instances = json.loads((tmp_path / "shapes/annotations/instances_test.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    side = 8
    images = []
    for image in instances["images"]:
        words, rows = [], []
        for obj in (a for a in instances["annotations"] if a["image_id"] == image["id"]):
            x, y, w, h = obj["bbox"]
            cx, cy = (x + w / 2) * side / image["width"], (y + h / 2) * side / image["height"]
            words.append(names[obj["category_id"]])
            rows.append(one_hot(int(cy), int(cx), side))
        images.append(decoded(image["id"], " ".join(words), rows))
    result = attention_localization(images, dataset, "test")
    assert result["score"] == 1.0
    assert result["object_words"] == len(instances["annotations"])
    assert 0 < result["uniform"] < 1
    assert result["categories"] == 6 and result["categories_without_words"] == {}

    no_boxes = attention_localization(images, {**dataset, "format": "karpathy"}, "test")
    assert no_boxes["score"] is None and no_boxes["uniform"] is None
    assert "no COCO instances file" in no_boxes["reason"]


def coco_dataset(root) -> dict:
    """conf/coco's dataset block: val and test are halves of val2017."""
    captions = "annotations/captions_val2017.json"
    return {
        "name": "coco2017",
        "format": "coco",
        "root": str(root),
        "splits": {
            "train": {"annotations": "annotations/captions_train2017.json", "images": "train2017"},
            "val": {"annotations": captions, "images": "val2017", "select": [0.0, 0.5]},
            "test": {"annotations": captions, "images": "val2017", "select": [0.5, 1.0]},
        },
    }


def test_localization_on_a_coco_2017_instances_file(tmp_path):
    """COCO's naming, category names and schema: boxes or polygons only, a category with no
    word list (skipped and counted), a phrase ("teddy bear"), man/dog as person/dog."""
    # 640 x 480 on a 4 x 4 grid: cell (row, col) covers x [160 col, 160 col + 160),
    # y [120 row, 120 row + 120).
    instances = {
        "info": {},
        "licenses": [],
        "images": [
            {"id": 139, "width": 640, "height": 480, "file_name": "000000000139.jpg"},
            {"id": 285, "width": 640, "height": 480, "file_name": "000000000285.jpg"},
        ],
        "categories": [
            *coco_like.CATEGORIES,
            {"id": 91, "name": "unicorn", "supercategory": "animal"},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 139,
                "category_id": 1,
                "bbox": [160, 120, 160, 120],
                "iscrowd": 0,
            },  # person: cell (1, 1)
            {
                "id": 2,
                "image_id": 139,
                "category_id": 18,
                "iscrowd": 0,  # dog: cell (2, 2)
                "segmentation": [[320, 240, 480, 240, 480, 360, 320, 360]],
            },
            {"id": 3, "image_id": 139, "category_id": 91, "bbox": [0, 0, 50, 50]},
            {"id": 4, "image_id": 285, "category_id": 91, "bbox": [0, 0, 50, 50]},
        ],
    }
    dataset = coco_dataset(tmp_path / "coco")
    annotations = tmp_path / "coco" / "annotations"
    annotations.mkdir(parents=True)
    (annotations / "instances_val2017.json").write_text(json.dumps(instances))
    assert instances_file(dataset, "test") == annotations / "instances_val2017.json"
    assert instances_file(dataset, "train") is None  # COCO's instances_train2017.json: absent

    caption = "a man with a dog and a unicorn near a teddy bear"
    rows = [one_hot(0, 0)] * len(caption.split())
    rows[1], rows[4] = one_hot(1, 1), one_hot(2, 2)  # "man" on the person, "dog" on the dog
    result = attention_localization([decoded(139, caption, rows)], dataset, "test")
    # man and dog hit; the image has no teddy bear: a miss; "unicorn" names nothing.
    assert (result["object_words"], result["hits"]) == (3, 2)
    assert result["score"] == pytest.approx(2 / 3)
    assert result["words_naming_an_absent_object"] == 1
    assert result["uniform"] == pytest.approx((1 / 16 + 1 / 16 + 0) / 3)
    assert result["categories"] == 80
    assert result["categories_without_words"] == {"unicorn": 1}  # image 285 is not scored
    assert result["instances"].endswith("instances_val2017.json")

    nothing = attention_localization([decoded(139, "a unicorn", [one_hot(0, 0)])], dataset, "test")
    assert nothing["score"] is None and "names an object category" in nothing["reason"]
    missing = attention_localization([], coco_dataset(tmp_path / "elsewhere"), "test")
    assert missing["score"] is None and "instances_val2017.json" in missing["reason"]


def test_instances_file_falls_back_to_the_split_name(tmp_path):
    dataset = {
        "name": "mine",
        "format": "coco",
        "root": str(tmp_path),
        "splits": {"test": {"annotations": "ann/refs.json", "images": "test"}},
    }
    (tmp_path / "ann").mkdir()
    assert instances_file(dataset, "test") is None
    (tmp_path / "ann" / "instances_test.json").write_text("{}")
    assert instances_file(dataset, "test") == tmp_path / "ann" / "instances_test.json"
    assert instances_file({**dataset, "format": "karpathy"}, "test") is None
    assert instances_file(dataset, "val") is None


def test_every_coco_category_has_words_and_no_word_names_two():
    assert set(COCO_CATEGORY_WORDS) == {c["name"] for c in coco_like.CATEGORIES}
    assert all(COCO_CATEGORY_WORDS.values())
    matcher = CategoryWords(CATEGORY_WORDS)  # a word in two categories would raise
    assert matcher.categories == set(COCO_CATEGORY_WORDS) | set(SHAPES)
    # The shapes data's lists are the words its captions use, by its categories.
    assert {w: c for c, words in SHAPES_CATEGORY_WORDS.items() for w in words} == SHAPE_WORDS
    assert list(SHAPES_CATEGORY_WORDS) == [c["name"] for c in SHAPES_CATEGORIES]
    with pytest.raises(ValueError, match="'dog' names both"):
        CategoryWords({"dog": ["dog"], "puppy": ["puppy", "dog"]})


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a teddy bear next to a bear", [(2, "teddy bear"), (6, "bear")]),
        ("two hot dogs and a dog", [(2, "hot dog"), (5, "dog")]),
        ("A Man at a stop sign", [(1, "person"), (5, "stop sign")]),
        ("a sign and a stop", []),
        ("a tennis player with a tennis racket", [(2, "person"), (6, "tennis racket")]),
    ],
)
def test_mentions_take_the_longest_phrase_at_its_last_word(caption, expected):
    assert CategoryWords(COCO_CATEGORY_WORDS).mentions(caption.split()) == expected


def test_attention_figure_has_a_panel_per_word(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8))
    figure = attention_figure(image, decoded(5, "a circle", [one_hot(0, 0), one_hot(3, 3)]))
    visible = [ax for ax in figure.axes if ax.images]
    assert [ax.get_title() for ax in visible] == ["image", "a", "circle"]
    # Each word's map covers the whole image, in image pixels.
    assert visible[1].images[1].get_array().shape == (30, 50)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    assert Image.open(buffer).format == "PNG"
