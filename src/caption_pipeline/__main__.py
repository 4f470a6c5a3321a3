"""The `caption-pipeline` command (and `python -m caption_pipeline`): `run` (Kedro's, the
default), `caption`, `serve` and `dvc-yaml`.

  caption-pipeline [run] [KEDRO RUN OPTIONS]      the pipeline, as `kedro run`
  caption-pipeline caption PATH... [--output F]   caption image files or folders, JSON lines
  caption-pipeline serve [--model M] [--port N]   the HTTP server and web page
  caption-pipeline dvc-yaml [--env ENV] [--check] write dvc.yaml from the Kedro project

Without --model, `caption` and `serve` use the export of the Kedro project in the current
folder (the catalog's `exported_model`); --model takes an export folder or an MLflow
`models:/NAME/VERSION` (or `runs:/`) URI. Bad input ends with one `Error: ...` line.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import click

from caption_pipeline.errors import DataError

COMMANDS = ("run", "caption", "serve", "dvc-yaml")
MODEL_HELP = (
    "export folder, or MLflow models:/NAME/VERSION; default: the project's "
    "exported_model (data/06_models/export/saved_model)"
)


@click.group(help=__doc__.split("\n\n")[0])
def cli() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@cli.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--env", default=None, help="Kedro config environment for the defaults")
@click.option("--beam-size", type=int, default=None, help="default: the export's")
@click.option("--attention", is_flag=True, help="add each word's attention map")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="write the JSON lines to this file instead of stdout",
)
@click.option("--batch-size", type=int, default=16, show_default=True)
def caption(
    paths: tuple[str, ...],
    model: str | None,
    env: str | None,
    beam_size: int | None,
    attention: bool,
    output: Path | None,
    batch_size: int,
) -> None:
    """Caption image files or folders: one JSON line per image ({"path", "caption",
    "beams"} or {"path", "error"}); exits 1 if any image could not be captioned."""
    from caption_pipeline.serving.inference import caption_files

    settings = _serve_settings(model, env, {})
    captioner = _load(model, env, beam_size)
    failed = total = 0
    with _output(output) as out:
        for record in caption_files(
            captioner,
            paths,
            beam_size=beam_size,
            attention=attention,
            batch_size=batch_size,
            max_pixels=settings.max_pixels,
        ):
            total += 1
            failed += "error" in record
            out.write(json.dumps(record) + "\n")
            out.flush()
    if failed:
        click.echo(f"{failed} of {total} images could not be captioned", err=True)
        sys.exit(1)


@cli.command()
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--env", default=None, help="Kedro config environment for the defaults")
@click.option("--host", default=None, help="default: serve.host (127.0.0.1)")
@click.option("--port", type=int, default=None, help="default: serve.port (8080)")
@click.option("--threads", type=int, default=None)
@click.option("--max-upload-mb", type=float, default=None)
@click.option("--max-pixels", type=int, default=None)
@click.option("--max-batch", type=int, default=None)
@click.option("--batch-wait-ms", type=float, default=None)
@click.option(
    "--max-queue",
    type=int,
    default=None,
    help="default: serve.max_queue (32); past it 503 with Retry-After",
)
@click.option(
    "--request-timeout-s",
    type=float,
    default=None,
    help="default: serve.request_timeout_s (30); past it 504",
)
@click.option(
    "--drain-timeout-s",
    type=float,
    default=None,
    help="default: serve.drain_timeout_s (20); on SIGTERM, the wait for in-flight requests",
)
def serve(model: str | None, env: str | None, **options: Any) -> None:
    """Run the HTTP server: POST /v1/caption, GET /healthz, /readyz and the web page /."""
    import logging

    from caption_pipeline.serving.export import ExportedCaptioner, read_export_info
    from caption_pipeline.serving.server import serve as run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = _serve_settings(model, env, options)
    path = _resolve(model, env)
    try:
        read_export_info(path)  # a wrong path fails now, not in the background loader
    except DataError as error:
        raise click.ClickException(str(error)) from None
    click.echo(
        f"caption-pipeline: serving {path} on http://{settings.host}:{settings.port}/", err=True
    )
    run_server(lambda: ExportedCaptioner(path), settings)


@cli.command("dvc-yaml")
@click.option(
    "--check",
    is_flag=True,
    help="write nothing; exit 1, naming the drift, if dvc.yaml is not up to date",
)
@click.option(
    "--env",
    default=None,
    help="the Kedro environment whose stages to write (default: the one dvc.yaml is for, "
    "else base): `--env coco` for COCO, whose raw data `dvc add` tracks",
)
def dvc_yaml(check: bool, env: str | None) -> None:
    """Write the project's dvc.yaml from its Kedro pipelines, catalog and conf/ environments
    (caption_pipeline.mlops.dvc_stages), printing what changed."""
    from caption_pipeline.atomic import atomic_path
    from caption_pipeline.mlops.dvc_drift import drift
    from caption_pipeline.mlops.dvc_render import generate, generated_env
    from caption_pipeline.mlops.dvc_stages import BASE, PROJECT_ROOT, load_project

    path = PROJECT_ROOT / "dvc.yaml"
    committed = path.read_text() if path.exists() else ""
    env = env or generated_env(committed) or BASE
    try:
        text = generate(load_project(PROJECT_ROOT, env))
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    changes = drift(committed, text)
    if check and changes:
        raise click.ClickException(
            f"{path} is not what `caption-pipeline dvc-yaml --env {env}` generates:\n"
            + "\n".join(changes)
        )
    if not check and changes:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    click.echo(
        "\n".join([f"{path} ({env}): {'up to date' if not changes else 'written'}", *changes]),
        err=True,
    )


def _resolve(model: str | None, env: str | None) -> Path:
    from caption_pipeline.serving.inference import resolve_model

    try:
        return resolve_model(model, Path.cwd(), env)
    except DataError as error:
        raise click.ClickException(str(error)) from None


def _load(model: str | None, env: str | None, beam_size: int | None):
    from caption_pipeline.serving.export import ExportedCaptioner

    try:
        captioner = ExportedCaptioner(_resolve(model, env))
    except DataError as error:
        raise click.ClickException(str(error)) from None
    if beam_size is not None and not 1 <= beam_size <= captioner.max_beam_size:
        raise click.BadParameter(
            f"must be in 1..{captioner.max_beam_size}, got {beam_size}", param_hint="--beam-size"
        )
    return captioner


def _serve_settings(model: str | None, env: str | None, options: dict[str, Any]):
    """`serve` parameters of the project (if in one, else conf/base's), overridden by the
    given options."""
    from caption_pipeline.params import defaults
    from caption_pipeline.serving.inference import project_config
    from caption_pipeline.serving.server import ServeSettings, check_settings

    params: dict[str, Any] = defaults("serve")
    if (Path.cwd() / "conf" / "base").is_dir():
        params = dict(project_config(Path.cwd(), env, "parameters").get("serve") or {})
    params.update({key: value for key, value in options.items() if value is not None})
    try:
        return check_settings(ServeSettings.from_params(params))
    except DataError as error:
        raise click.ClickException(str(error)) from None


@contextlib.contextmanager
def _output(path: Path | None) -> Iterator[TextIO]:
    """stdout, or `path` written atomically (complete when the command ends)."""
    if path is None:
        yield sys.stdout
        return
    from caption_pipeline.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as out:
        yield out


def add_kedro_run(group: click.Group, package_name: str) -> None:
    """Kedro's `run` command as the `run` subcommand."""
    from kedro.framework.cli.utils import find_run_command

    group.add_command(find_run_command(package_name), "run")


def argv_with_default(args: list[str]) -> list[str]:
    """`caption-pipeline [KEDRO RUN OPTIONS]` keeps meaning `caption-pipeline run ...`."""
    if args and (args[0] in COMMANDS or args[0] in ("-h", "--help")):
        return args
    return ["run", *args]


def main(args: list[str] | None = None, **kwargs: Any) -> Any:
    argv = argv_with_default(list(sys.argv[1:] if args is None else args))
    if argv[0] == "run":
        # Only `run` sets up the Kedro project (and its logging, which writes to stdout:
        # `caption` keeps stdout for its JSON lines).
        from kedro.framework.project import configure_project

        package_name = Path(__file__).parent.name
        configure_project(package_name)
        add_kedro_run(cli, package_name)
    kwargs.setdefault("standalone_mode", not hasattr(sys, "ps1"))
    return cli.main(args=argv, prog_name="caption-pipeline", **kwargs)


if __name__ == "__main__":
    main()
