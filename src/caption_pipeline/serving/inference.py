"""Captioning images with an exported model: what the CLI, the HTTP server and the MLflow
model share.

* `prepare_image` checks an upload or file with Pillow before the model sees it (header-only
  size check against decompression bombs, full decode for truncated or corrupt data) and
  hands on bytes that the model's in-graph decoder reads as training read the image.
* `caption_record` turns one image's model outputs into the JSON-ready answer.
* `resolve_model` finds the export: a folder, an MLflow `models:/` or `runs:/` URI, or (none
  given) the catalog's `exported_model` of the Kedro project in the current folder.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from caption_pipeline.conf_loader import CONFIG_LOADER_ARGS, CONFIG_LOADER_CLASS
from caption_pipeline.data.images import DEFAULT_MAX_PIXELS, decode_image
from caption_pipeline.data.images import _read as read_image_file  # ImageError when unreadable
from caption_pipeline.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
EXPORT_DATASET = "exported_model"  # the catalog entry of the export folder
MLFLOW_ARTIFACT = "saved_model"  # the pyfunc model's artifact that holds the export


def prepare_image(
    source: bytes | os.PathLike, name: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> bytes:
    """The image in `source` (bytes or a file) checked and ready for the model;
    `images.ImageError` (reason, name) if unusable.

    Plain RGB JPEG and PNG files without an EXIF rotation pass as they are. Anything else
    (grey, CMYK, palette, alpha, 16-bit, rotated by EXIF, GIF, WebP, TIFF ...) is passed as
    the PNG of the upright 8-bit RGB image that ingestion would have made of it. The graph
    handles the JPEG and PNG cases itself too (`image_graph`, the same pixels); this
    conversion is for the formats it refuses (WebP, TIFF, transparent GIF).
    """
    data = source if isinstance(source, bytes) else read_image_file(source, name)
    decoded = decode_image(data, max_pixels=max_pixels, name=name)
    if decoded.format in ("JPEG", "PNG") and decoded.mode == "RGB" and decoded.orientation == 1:
        return data
    buffer = io.BytesIO()
    decoded.image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def caption_record(
    outputs: Mapping[str, np.ndarray], index: int, grid: Sequence[int], attention: bool = False
) -> dict[str, Any]:
    """Image `index` of the model's outputs as JSON-ready data: the caption, the beams with
    their scores (beams that never lived, at -inf, are left out) and, if asked, the best
    beam's words with one H x W attention map per word (<end> included)."""
    scores = outputs["scores"][index]
    beams = [
        {
            "caption": str(outputs["captions"][index, k]),
            "score": round(float(scores[k]), 5),
            "log_prob": round(float(outputs["log_probs"][index, k]), 5),
            "length": int(outputs["lengths"][index, k]),
        }
        for k in range(len(scores))
        if np.isfinite(scores[k])
    ]
    record: dict[str, Any] = {"caption": str(outputs["caption"][index]), "beams": beams}
    if attention:
        steps = int(outputs["lengths"][index, 0])
        maps = outputs["attention"][index, 0, :steps]  # [steps, H, W]
        record["attention"] = {
            "grid": [int(g) for g in grid],
            "words": [str(w) for w in outputs["tokens"][index, 0, :steps]],
            "maps": np.round(maps.astype(np.float64), 5).tolist(),
        }
    return record


def image_files(paths: Iterable[str | os.PathLike]) -> Iterator[tuple[Path, bool]]:
    """(file, from_folder) for each path: a file as given, a folder's image files (by suffix,
    recursively, sorted). A path that does not exist is yielded too, to be reported."""
    for path in map(Path, paths):
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                    yield file, True
        else:
            yield path, False


def resolve_model(
    model: str | None, project: str | os.PathLike = ".", env: str | None = None
) -> Path:
    """The export folder that `model` names (see the module docstring)."""
    if model is None:
        return default_export(Path(project), env)
    if model.startswith(("models:/", "runs:/")):
        return mlflow_export(model)
    return Path(model)


def default_export(project: Path, env: str | None = None) -> Path:
    """The `exported_model` path of the project's catalog (`conf/`, base + env)."""
    catalog = project_config(project, env, "catalog")
    if EXPORT_DATASET not in catalog:
        raise DataError(f"{project / 'conf'}: the catalog has no {EXPORT_DATASET!r} entry")
    path = Path(catalog[EXPORT_DATASET]["path"])
    return path if path.is_absolute() else project / path


def project_config(project: Path, env: str | None, key: str) -> dict[str, Any]:
    """`catalog` or `parameters` of the Kedro project in `project`, as `kedro run` reads it:
    with the loader and its arguments of the project's settings.py (base + `env`, else local)."""
    conf = project / "conf"
    if not (conf / "base").is_dir():
        raise DataError(
            f"no --model given and {project.resolve()} is not a caption-pipeline "
            f"project (no conf/base): pass --model PATH_OR_MODELS_URI"
        )
    loader = CONFIG_LOADER_CLASS(str(conf), env=env, **CONFIG_LOADER_ARGS)
    return dict(loader[key])


def caption_each(model, images: list[bytes], beam_size: int | None) -> list[tuple[Any, int] | str]:
    """`model.caption` of `images` as one batch: per image, (the outputs, its index in them),
    or, for an image the graph refuses, the reason. A refused batch is split in halves down to
    the image, so that one image never fails the others (the CLI's files, a pyfunc's rows)."""
    from caption_pipeline.serving.export import RefusedImages

    try:
        outputs = model.caption(images, beam_size)
    except DataError as error:
        if not isinstance(error, RefusedImages):
            raise  # a setting (beam size), not an image
        failure: Exception = error
    except Exception as error:  # noqa: BLE001 (the graph failed on an image: find which)
        failure = error
    else:
        return [(outputs, i) for i in range(len(images))]
    if len(images) > 1:
        half = len(images) // 2
        return caption_each(model, images[:half], beam_size) + caption_each(
            model, images[half:], beam_size
        )
    return [(str(failure).strip() or type(failure).__name__).splitlines()[0]]


def caption_files(
    model,
    paths: Sequence[str | os.PathLike],
    *,
    beam_size: int | None = None,
    attention: bool = False,
    batch_size: int = 16,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[dict[str, Any]]:
    """One record per image file of `paths` (files, or folders of images): {"path", and the
    `caption_record` fields} or {"path", "error": {"code", "message"}}. A bad file never
    stops the others; a progress bar (stderr) shows when a folder is given."""
    from tqdm.auto import tqdm

    from caption_pipeline.data.images import ImageError

    files = list(image_files(paths))
    grid = model.info["grid"]

    def run(batch: list[tuple[Path, bytes]]) -> list[dict[str, Any]]:
        return [
            {"path": str(path), **_error_record("model_error", result)}
            if isinstance(result, str)
            else {"path": str(path), **caption_record(*result, grid, attention)}
            for (path, _), result in zip(
                batch, caption_each(model, [d for _, d in batch], beam_size), strict=True
            )
        ]

    pending: list[tuple[Path, bytes]] = []
    with tqdm(
        total=len(files),
        unit="image",
        desc="caption",
        disable=not any(from_folder for _, from_folder in files),
    ) as bar:
        for path, _ in files:
            try:
                pending.append((path, prepare_image(path, str(path), max_pixels)))
            except ImageError as error:
                yield {"path": str(path), **_error_record(error.reason, str(error))}
            if len(pending) >= batch_size:
                yield from run(pending)
                pending = []
            bar.update()
        if pending:
            yield from run(pending)


def _error_record(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def mlflow_export(uri: str) -> Path:
    """Download the MLflow model `uri` (from the current tracking / registry URI) and return
    its export folder."""
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as error:  # noqa: BLE001 (MLflow raises many kinds for a bad URI)
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise DataError(
            f"model {uri}: cannot be fetched from MLflow at {mlflow.get_tracking_uri()} ({reason})"
        ) from None
    folder = local / "artifacts" / MLFLOW_ARTIFACT
    if not folder.is_dir():
        raise DataError(
            f"model {uri}: not a caption-pipeline MLflow model (no artifacts/{MLFLOW_ARTIFACT})"
        )
    return folder
