"""A COCO-shaped dataset generator, for rehearsing runs at COCO's scale (never the default data).

`python -m caption_pipeline.data.coco_like --out DIR --scale N --seed S` writes, under DIR, what
`kedro run --env coco` expects under `data/01_raw/coco` (conf/coco/parameters.yml), with COCO
2017's file layout, JSON schemas, image sizes, file sizes, caption counts, caption lengths and
word statistics, so a run of the whole pipeline at full scale (118,287 train images) can be
timed, sized and broken before the real 19 GB are downloaded:

    DIR/train2017/000000xxxxxx.jpg            N images
    DIR/val2017/000000xxxxxx.jpg              N * 5,000 / 118,287 images (at least 32)
    DIR/annotations/captions_train2017.json   info, licenses, images, annotations (captions)
    DIR/annotations/captions_val2017.json
    DIR/annotations/instances_val2017.json    + categories (COCO's 80) and object boxes
    DIR/dataset_coco.json                     the same captions as Karpathy's split file
    DIR/coco_like.json                        this generator's marker: parameters, summary

One module per step, each with what it models and the numbers (measured on this project's
2-core CPU machine) in its doc:

- `coco2017`: COCO 2017's numbers, folder names and 80 categories (data only).
- `plans`: everything about an image but its pixels: size, blobs (its objects), captions, ids,
  each image from its own seeded generator.
- `pixels`: the pixels drawn from a plan, and the JPEG (COCO's ~160 kB per file).
- `json_files`: the JSON files, in COCO's and Karpathy's schemas.
- `writer`: the folder, written resumably (`generate`), and the command line (`main`).

Captions (`caption_pipeline.data.coco_like.captions`). 5 per image, rarely 6 or 7 (COCO 2017:
591,753 captions for 118,287 images, 5.003 each). Words per caption: a table shaped like
COCO's (8 to 12 words for 84 %, 1 % under 8, 1 % over 20, up to 30), mean 10.53. Words are
drawn independently from a Zipf-Mandelbrot law p(r) ~ (r + 2.7)^-1.5427 over 30,000 ranks:
about COCO's 100 most frequent words first (the offset 2.7 keeps "a" at 13.7 % of all words,
where plain Zipf at this exponent gives it over a third), then pronounceable consonant-vowel
tokens ("nomu", "pofele"), which the PTB tokenizer keeps whole (tests/test_coco_like.py checks
all 30,000). The exponent was solved for so that the vocab stage (`min_count: 5`, captions cut
at 20 words) finds 10,204 words in a full-scale train split, as the original project did on
COCO. `expected_vocabulary` is that number under the model, exactly: the sum over words of
P(Poisson(expected count) >= 5), 10,203 at 591,753 captions; `simulated_vocabulary`
(counting sampled words) gives 10,203 on average over 32 seeds (sd 40), and the captions of
a full-scale generation (seed 0) gave 10,186 words to `text.Vocabulary.build`, out of 25,546
distinct words. Smaller scales have smaller vocabularies (expected: 1,310 words at 5,000
train images, 3,223 at 20,000, 5,839 at 50,000).

The same arguments give byte-identical files, whatever the number of worker processes.
"""

# The caption model, for callers of `coco_like.sample_captions` and the like.
from caption_pipeline.data.coco_like.captions import (
    CAPTION_COUNTS,
    expected_vocabulary,
    sample_captions,
)
from caption_pipeline.data.coco_like.coco2017 import (
    CATEGORIES,
    COCO_MAX_CAPTION_ID,
    COCO_MAX_IMAGE_ID,
    COCO_TRAIN_CAPTIONS,
    COCO_TRAIN_IMAGES,
    COCO_VAL_IMAGES,
    FOLDERS,
    KARPATHY_RESTVAL_P,
    MIN_VAL_IMAGES,
    TARGET_VOCABULARY,
)
from caption_pipeline.data.coco_like.json_files import (
    GENERATOR_VERSION,
    INFO,
    LICENSES,
    captions_json,
    instances_json,
    karpathy_json,
)
from caption_pipeline.data.coco_like.pixels import JPEG_QUALITY, encode_jpeg, render_image
from caption_pipeline.data.coco_like.plans import (
    GRAYSCALE_P,
    LONG_SIDE,
    PERSON_P,
    PORTRAIT_P,
    SHORT_SIDES,
    UNIFORM_SHORT_P,
    Blob,
    ImagePlan,
    image_rng,
    plan_dataset,
    sample_blobs,
    sample_image_size,
    split_sizes,
)
from caption_pipeline.data.coco_like.writer import MARKER_FILE, generate, main

__all__ = [
    "CAPTION_COUNTS",
    "CATEGORIES",
    "COCO_MAX_CAPTION_ID",
    "COCO_MAX_IMAGE_ID",
    "COCO_TRAIN_CAPTIONS",
    "COCO_TRAIN_IMAGES",
    "COCO_VAL_IMAGES",
    "FOLDERS",
    "GENERATOR_VERSION",
    "GRAYSCALE_P",
    "INFO",
    "JPEG_QUALITY",
    "KARPATHY_RESTVAL_P",
    "LICENSES",
    "LONG_SIDE",
    "MARKER_FILE",
    "MIN_VAL_IMAGES",
    "PERSON_P",
    "PORTRAIT_P",
    "SHORT_SIDES",
    "TARGET_VOCABULARY",
    "UNIFORM_SHORT_P",
    "Blob",
    "ImagePlan",
    "captions_json",
    "encode_jpeg",
    "expected_vocabulary",
    "generate",
    "image_rng",
    "instances_json",
    "karpathy_json",
    "main",
    "plan_dataset",
    "render_image",
    "sample_blobs",
    "sample_captions",
    "sample_image_size",
    "split_sizes",
]
