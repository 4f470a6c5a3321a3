"""pycocoevalcap's scorers as the COCO leaderboard runs them: BLEU-1..4, METEOR, ROUGE-L,
CIDEr-D (its `Cider` is CIDEr-D: sigma 6, clipped counts), and SPICE where it can run, on
captions and references tokenized by its own PTBTokenizer (`CocoScorer`). The tokenizer and
METEOR run on Java, SPICE on Java 8 with Stanford CoreNLP's jars: `require_java` is called
before anything long runs, and `spice_problem` says why SPICE is left out.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import subprocess
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from caption_pipeline.errors import DataError

logger = logging.getLogger(__name__)

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
# SPICE parses captions with Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use.
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
JAVA_INSTALL = (
    "pycocoevalcap's PTB tokenizer and METEOR run on Java. Install a Java runtime and put "
    "`java` on PATH, e.g. `sudo apt-get install default-jre-headless` (Debian/Ubuntu), "
    "`conda install -c conda-forge openjdk`, or `brew install openjdk` (macOS)"
)


def require_java() -> str:
    """`java -version`'s first line; a DataError saying how to install Java if it won't run."""
    java = shutil.which("java")
    if java is None:
        raise DataError(f"evaluation needs Java, and `java` is not on PATH. {JAVA_INSTALL}")
    try:
        run = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DataError(
            f"evaluation needs Java: {java} does not run ({error}). {JAVA_INSTALL}"
        ) from None
    version = (run.stderr or run.stdout).strip().splitlines()
    if run.returncode != 0 or not version:
        raise DataError(
            f"evaluation needs Java: `{java} -version` failed "
            f"({' '.join(version)[:200]}). {JAVA_INSTALL}"
        )
    return version[0]


def java_major_version(version_line: str) -> int | None:
    """8 for 'openjdk version "1.8.0_392"', 17 for '... "17.0.15" ...'; None if unparsable."""
    match = re.search(r'"(\d+)(?:\.(\d+))?', version_line)
    if match is None:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def spice_problem(java_version: str) -> str | None:
    """Why SPICE cannot run here, or None when it can (its jars are there, on Java 8)."""
    from pycocoevalcap.spice import spice

    lib = Path(spice.__file__).parent / "lib"
    missing = [jar for jar in SPICE_JARS if not (lib / jar).is_file()]
    if missing:
        return (
            f"SPICE skipped: it needs the Stanford CoreNLP 3.6.0 jars {missing} in {lib} "
            f"(a download: `python -m pycocoevalcap.spice.get_stanford_models`) and Java 8"
        )
    if java_major_version(java_version) != 8:
        return f"SPICE skipped: it runs on Java 8 only, this is {java_version!r}"
    return None


@dataclass(frozen=True)
class Scores:
    """Corpus-level scores and each image's (metric name -> value)."""

    overall: dict[str, float]
    per_image: dict[int, dict[str, float]]


# Characters Java's PTBTokenizer takes as the end of a line: inside a caption, any of them
# would shift every later caption of its batch onto the wrong image.
_LINE_BREAKS = re.compile("[\r\n\v\f\x85\u2028\u2029]")


class CocoScorer:
    """pycocoevalcap's tokenizer and scorers, with one METEOR process for every `score` call.

    Use as a context manager (it stops the METEOR process). SPICE is added when its jars and
    Java 8 are there; otherwise the reason is logged once, here.
    """

    def __init__(self, java_version: str | None = None):
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        problem = spice_problem(java_version or require_java())
        if problem:
            logger.info(problem)
        self.spice = problem or "computed"  # for the report
        self._tokenizer = PTBTokenizer()
        self._meteor = Meteor()
        self._scorers = [
            (Bleu(4), list(METRICS[:4])),
            (self._meteor, "METEOR"),
            (Rouge(), "ROUGE_L"),
            (Cider(), "CIDEr"),
        ]
        if problem is None:
            from pycocoevalcap.spice.spice import Spice

            self._scorers.append((Spice(), "SPICE"))

    @property
    def metrics(self) -> list[str]:
        return [
            m for _, names in self._scorers for m in ([names] if isinstance(names, str) else names)
        ]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        process = self._meteor.meteor_p
        if process.poll() is None:
            process.stdin.close()
            process.kill()
            process.wait()

    def tokenize(self, captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
        """pycocoevalcap's PTBTokenizer (lower case, punctuation dropped), every caption of
        every key in one Java run; the lists keep their order."""
        captions = {key: list(texts) for key, texts in captions.items() if texts}
        tokenized = self._tokenizer.tokenize(
            {
                key: [{"caption": _LINE_BREAKS.sub(" ", text)} for text in texts]
                for key, texts in captions.items()
            }
        )
        if any(len(tokenized.get(key, ())) != len(texts) for key, texts in captions.items()):
            raise RuntimeError("PTBTokenizer returned another number of lines than it was given")
        return tokenized

    def score(self, captions: Mapping[int, str], references: Mapping[int, Sequence[str]]) -> Scores:
        """Score one TOKENIZED caption per image against its tokenized references."""
        if set(captions) != set(references) or not captions:
            extra = sorted(set(captions) - set(references))[:5]
            lacking = sorted(set(references) - set(captions))[:5]
            raise DataError(
                f"scoring needs one caption per referenced image: images without "
                f"references {extra}, without a caption {lacking}"
            )
        ids = sorted(captions)
        res = {i: [captions[i]] for i in ids}
        gts = {i: list(references[i]) for i in ids}
        overall: dict[str, float] = {}
        per_image: dict[int, dict[str, float]] = {i: {} for i in ids}
        for scorer, names in self._scorers:
            with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its counts
                score, scores = scorer.compute_score(gts, res)
            if isinstance(names, str):
                names, score, scores = [names], [score], [scores]
            for name, total, values in zip(names, score, scores, strict=True):
                overall[name] = float(total)
                for image_id, value in zip(ids, values, strict=True):  # the scorers' order
                    per_image[image_id][name] = _per_image_value(value)
        return Scores(overall, per_image)


def _per_image_value(value: Any) -> float:
    # SPICE gives a dict per image ({"All": {"f": ...}, ...}); the others a number.
    return float(value["All"]["f"]) if isinstance(value, dict) else float(value)
