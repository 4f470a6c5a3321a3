"""Screenshots of the Kedro-Viz graph: docs/kedro_viz.png (README) and docs/kedro_viz_train.png
(docs/architecture.md, the training phases).

    kedro viz build && python docs/screenshot_viz.py
    python docs/screenshot_viz.py --pipeline train --expand docs/kedro_viz_train.png

Serves `build/` on 127.0.0.1 and opens it in headless Chromium (Debian: `apt-get install
chromium chromium-driver`) through Selenium (tests/helpers.py's `chromium`): the default
pipeline with the stage namespaces collapsed, or one pipeline with them expanded.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for `tests.helpers`: `python docs/X.py` puts docs/ on the path

from tests.helpers import chromium  # noqa: E402

# Kedro-Viz keeps its UI state in localStorage["KedroViz"]; set before the app starts.
SETTINGS = {
    "pipeline": {"active": "__default__"},
    "nodeType": {"disabled": {"parameters": True, "task": False, "data": False}},
    "layer": {"visible": True},
    "textLabels": True,
    "visible": {
        "code": False,
        "graph": True,
        "miniMap": False,
        "sidebar": False,
        "slicing": True,
        "traceback": False,
    },
    "theme": "light",
    "showFeatureHints": False,
    "expandAllPipelines": False,
    "orientation": "horizontal",
}


def main(
    build: Path = ROOT / "build",
    out: Path = ROOT / "docs" / "kedro_viz.png",
    pipeline: str = "__default__",
    expand: bool = False,
) -> None:
    if not (build / "api" / "main").is_file():
        sys.exit(f"{build}/api/main not found: run `kedro viz build` first")
    settings = {**SETTINGS, "pipeline": {"active": pipeline}, "expandAllPipelines": expand}
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(build))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    driver = chromium(1500, 620, "--hide-scrollbars", "--force-device-scale-factor=2")
    try:
        driver.execute_cdp_cmd(
            "Page.addScriptToEvaluateOnNewDocument",
            {"source": f"localStorage.setItem('KedroViz', {json.dumps(json.dumps(settings))});"},
        )
        driver.get(f"http://127.0.0.1:{server.server_port}/")
        time.sleep(8)  # layout and transitions
        driver.save_screenshot(str(out))
    finally:
        driver.quit()
        server.shutdown()
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=ROOT / "docs" / "kedro_viz.png")
    parser.add_argument("--pipeline", default="__default__", help="a registered pipeline")
    parser.add_argument("--expand", action="store_true", help="expand the namespaces")
    args = parser.parse_args()
    main(out=args.out, pipeline=args.pipeline, expand=args.expand)
