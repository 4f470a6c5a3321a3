"""`python -m caption_pipeline.data.coco_like --out DIR --scale N [--seed S] [--workers W]`: the
command line lives in `writer.main`, so that tests and scripts call the same function."""

import sys

from caption_pipeline.data.coco_like.writer import main

if __name__ == "__main__":
    main(sys.argv[1:])
