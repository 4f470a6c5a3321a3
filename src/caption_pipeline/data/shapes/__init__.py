"""The embedded "shapes" dataset: coloured shapes on textured backgrounds, in MS COCO layout.

Every image holds 1 to 3 objects (6 shapes, 6 colours, 2 sizes) on a noisy or striped
background, and gets several different captions that are true for it: colours, sizes, counts
("two red squares"), relations between objects ("left of", "above"), order and position, all
computed from the objects' box centres. A COCO `instances` file per split holds those boxes
and polygons, so evaluation can check whether attention on a shape word lands on an object of
that shape (`attention_maps`), and the compact encoder can pretrain on them.

Everything is drawn from a numpy Generator seeded by (seed, split, index), so an image does
not depend on the order of generation or on the size of the other splits, and the same
parameters give byte-identical files.

One module per step: `scene` (the objects of an image and where they are), `captions` (the
sentences true of them), `drawing` (the pixels), `config` (the parameters and the layout on
disk), `writer` (the COCO files, and the generation kept or redone as a whole).
"""

from caption_pipeline.data.shapes.captions import (
    MAX_CAPTIONS_PER_IMAGE,
    SHAPE_WORDS,
    SIZE_WORDS,
    TEMPLATES,
    make_captions,
    position_holds,
    relation_holds,
)
from caption_pipeline.data.shapes.config import (
    GENERATOR_VERSION,
    ShapesConfig,
    SplitLayout,
    fingerprint,
    layout_from_dataset,
)
from caption_pipeline.data.shapes.drawing import render_scene
from caption_pipeline.data.shapes.scene import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    box_centre,
    sample_objects,
)
from caption_pipeline.data.shapes.writer import (
    CATEGORIES,
    MARKER_FILE,
    ensure_generated,
    generate_image,
)

__all__ = [
    "BACKGROUNDS",
    "CATEGORIES",
    "COLOURS",
    "GENERATOR_VERSION",
    "MARKER_FILE",
    "MAX_CAPTIONS_PER_IMAGE",
    "SHAPES",
    "SHAPE_WORDS",
    "SIZES",
    "SIZE_WORDS",
    "TEMPLATES",
    "Scene",
    "ShapeObject",
    "ShapesConfig",
    "SplitLayout",
    "box_centre",
    "ensure_generated",
    "fingerprint",
    "generate_image",
    "layout_from_dataset",
    "make_captions",
    "position_holds",
    "relation_holds",
    "render_scene",
    "sample_objects",
]
