"""`caption-pipeline` / `python -m caption_pipeline`: `run` (the Kedro pipeline, as `kedro run`;
also what no subcommand means), `caption` and `serve` (see `caption_pipeline.commands`)."""

import sys
from pathlib import Path
from typing import Any


def main(args: list[str] | None = None, **kwargs: Any) -> Any:
    from caption_pipeline.commands import add_kedro_run, argv_with_default, cli

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
