"""The evaluation protocol, enforced: every choice is made on train or val; the test split is
decoded and scored once per run, by the `evaluate` pipeline, and only reported.

Every sweep and benchmark that reads or generates a split of a data set names it through
`selection_split`, on the command line (`add_split_argument`, so that `--split test` is refused
before any work) and again where it loads the split, so that a name computed at run time
(`f"{prefix}test"`, a loop over the manifest's splits) is refused too.
tests/test_evaluation_protocol.py calls each entry point with `--split test`, and checks the
code for the test split's names and the test-only sections of metrics.json.
"""

from __future__ import annotations

import argparse

from caption_pipeline.errors import DataError

SELECTION_SPLITS = ("train", "val")


def selection_split(split: str, who: str = "a sweep or benchmark") -> str:
    """`split` if a choice may be made on it (train or val); else a DataError saying why."""
    if split not in SELECTION_SPLITS:
        raise DataError(
            f"{who}: split {split!r} refused: settings are chosen on "
            f"{' or '.join(SELECTION_SPLITS)} only; the test split is scored once per run by "
            "the evaluate pipeline and only reported (docs/benchmarks.md, Evaluation protocol)"
        )
    return split


def add_split_argument(parser: argparse.ArgumentParser, default: str = "val") -> None:
    """`--split`, the split a script's figures are of: refused by argparse (one line, exit 2)
    unless train or val."""

    def checked(value: str) -> str:
        try:
            return selection_split(value, parser.prog)
        except DataError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parser.add_argument(
        "--split",
        type=checked,
        default=default,
        help=f"the split the figures are of, where choices are made: {SELECTION_SPLITS}",
    )
