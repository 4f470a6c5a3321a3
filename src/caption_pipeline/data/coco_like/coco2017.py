"""What of MS COCO 2017 the COCO-like data imitates: its sizes, id ranges, folder names and its
80 object categories. Data only, no logic.

The numbers are COCO 2017's own (captions_train2017.json, instances_val2017.json), so that a
rehearsal at `scale` = COCO_TRAIN_IMAGES has COCO's size, and smaller scales keep its
proportions (val is COCO_VAL_IMAGES / COCO_TRAIN_IMAGES of train). TARGET_VOCABULARY is what
the caption model is calibrated to (`caption_pipeline.data.coco_like.captions`, the package's doc):
the vocabulary the original project found on COCO's train captions. The categories keep COCO's
ids, gaps included (12, 26, 29, ... do not exist), and names, because `coco_instances` turns
the ids into these names and the evaluation's category words (`category_words`) are keyed on
them.
"""

from __future__ import annotations

# MS COCO 2017, for proportions.
COCO_TRAIN_IMAGES = 118_287
COCO_VAL_IMAGES = 5_000
COCO_TRAIN_CAPTIONS = 591_753
COCO_MAX_IMAGE_ID = 581_929
COCO_MAX_CAPTION_ID = 830_000  # about where COCO 2017's caption ids end
MIN_VAL_IMAGES = 32  # so that the val and test halves hold a few images each at tiny scales
TARGET_VOCABULARY = 10_204  # words seen >= 5 times in COCO train (the original project)
KARPATHY_RESTVAL_P = 30_504 / 113_287  # Karpathy's restval share of the training images

FOLDERS = {"train": "train2017", "val": "val2017"}

# COCO's 80 categories by supercategory: "id name" (ids with COCO's gaps).
_CATEGORY_TABLE = {
    "person": "1 person",
    "vehicle": "2 bicycle|3 car|4 motorcycle|5 airplane|6 bus|7 train|8 truck|9 boat",
    "outdoor": "10 traffic light|11 fire hydrant|13 stop sign|14 parking meter|15 bench",
    "animal": "16 bird|17 cat|18 dog|19 horse|20 sheep|21 cow|22 elephant|23 bear|24 zebra|"
    "25 giraffe",
    "accessory": "27 backpack|28 umbrella|31 handbag|32 tie|33 suitcase",
    "sports": "34 frisbee|35 skis|36 snowboard|37 sports ball|38 kite|39 baseball bat|"
    "40 baseball glove|41 skateboard|42 surfboard|43 tennis racket",
    "kitchen": "44 bottle|46 wine glass|47 cup|48 fork|49 knife|50 spoon|51 bowl",
    "food": "52 banana|53 apple|54 sandwich|55 orange|56 broccoli|57 carrot|58 hot dog|59 pizza|"
    "60 donut|61 cake",
    "furniture": "62 chair|63 couch|64 potted plant|65 bed|67 dining table|70 toilet",
    "electronic": "72 tv|73 laptop|74 mouse|75 remote|76 keyboard|77 cell phone",
    "appliance": "78 microwave|79 oven|80 toaster|81 sink|82 refrigerator",
    "indoor": "84 book|85 clock|86 vase|87 scissors|88 teddy bear|89 hair drier|90 toothbrush",
}
# instances_*.json's "categories", in COCO's order: {"supercategory", "id", "name"} each.
CATEGORIES = tuple(
    {
        "supercategory": supercategory,
        "id": int(entry.split(" ", 1)[0]),
        "name": entry.split(" ", 1)[1],
    }
    for supercategory, entries in _CATEGORY_TABLE.items()
    for entry in entries.split("|")
)
