"""Screenshots of the MLflow UI: docs/mlflow_run.png (README) and docs/mlflow_model.png
(docs/usage.md).

    kedro run && python docs/screenshot_mlflow.py [PROJECT]

Starts `mlflow server` on PROJECT's mlflow.db (default: this project) on 127.0.0.1 with a free
port and opens, in headless Chromium (Debian: `apt-get install chromium chromium-driver`)
through Selenium (tests/helpers.py's `chromium`):

- the run that registered the `champion` version of `image-captioner` (or --run-id), on its
  "Model metrics" tab with the charts filtered to the training curves (--charts, a regular
  expression over the metric names; the UI's own chart search): docs/mlflow_run.png;
- that model version's page, with its aliases, source run and promotion tags:
  docs/mlflow_model.png.

Exits non-zero, saying what is missing, when the database, the model, the alias, the run or
its training metrics are not there.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for `tests.helpers`: `python docs/X.py` puts docs/ on the path

from tests.helpers import chromium, free_port  # noqa: E402

MODEL, ALIAS = "image-captioner", "champion"
# Two curves per training phase, each one per logged step and one per epoch on val: the loss
# and val cross-entropy of cross-entropy training (xent.) and of the encoder's fine-tuning
# (fine_tune.), SCST's reward and val CIDEr-D (epoch 0: the cross-entropy model). A phase the
# run did not have has no chart.
CHARTS = r"^(xent|fine_tune)\.(loss|val_xent)$|^scst\.(reward|val_cider)$"
TRAINING_PREFIXES = ("xent.", "fine_tune.", "scst.")
WIDTH = 1400  # CSS pixels, and pixels of the PNGs (device scale factor 1)
# The UI's state in localStorage, set before the app starts: the model-training sidebar (not
# GenAI's), and the MLflow Assistant panel closed (it opens itself on a first visit).
LOCAL_STORAGE = {
    "mlflow.workflowType_v1": json.dumps("machine_learning"),
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
    "mlflow.assistant.panelOpen_v1": "false",
    "_mlflow_dark_mode_toggle_enabled": "false",
    "databricks-dark-mode-pref": "light",
}
# Plotly's toolbar over every chart and the Assistant's button only cover the pictures.
HIDE_CSS = ".modebar-container, [data-assistant-ui] { display: none !important; }"
MAX_BYTES = 300_000


def fail(message: str) -> NoReturn:
    sys.exit(f"screenshot_mlflow: {message}")


# --- the server ---------------------------------------------------------------------------------


def start_server(database: Path, port: int, log: Path, timeout: float = 120) -> subprocess.Popen:
    """`mlflow server` on the sqlite database, in its own process group; returns once /health
    answers."""
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{database.resolve()}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    with log.open("w") as out:
        server = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            fail(f"mlflow server exited with {server.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    stop_server(server)
    fail(f"mlflow server did not answer on port {port} in {timeout:.0f} s:\n{tail(log)}")


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it and its uvicorn worker), SIGKILL after 10 s."""
    if server.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def api(base: str, endpoint: str, **query: str) -> dict[str, Any] | None:
    """GET /api/2.0/mlflow/<endpoint>; None when MLflow answers that it does not exist."""
    url = f"{base}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        if error.code in (400, 404):  # RESOURCE_DOES_NOT_EXIST, INVALID_PARAMETER_VALUE
            return None
        fail(f"{url}: HTTP {error.code} {error.read()[:500]!r}")
    except urllib.error.URLError as error:
        fail(f"{url}: {error.reason}")


# --- what to show ------------------------------------------------------------------------------


def find_version_and_run(base: str, run_id: str | None) -> tuple[dict, dict]:
    """(the model version that holds ALIAS, the run to show: run_id or that version's run)."""
    if api(base, "registered-models/get", name=MODEL) is None:
        fail(
            f"no registered model {MODEL!r} in the database: run `kedro run` (the export "
            "stage registers it)"
        )
    found = api(base, "registered-models/alias", name=MODEL, alias=ALIAS)
    if found is None:
        fail(f"{MODEL!r} has no version with the alias {ALIAS!r}")
    version = found["model_version"]
    run_id = run_id or version.get("run_id")
    if not run_id:
        fail(f"{MODEL!r} version {version['version']} names no source run: give --run-id")
    run = (api(base, "runs/get", run_id=run_id) or {}).get("run")
    if run is None:
        fail(f"no run {run_id} in the database")
    if run["info"]["status"] != "FINISHED":
        fail(f"run {run_id} is {run['info']['status']}, not FINISHED")
    return version, run


def chart_metrics(run: dict, charts: str) -> list[str]:
    """The run's metrics that the chart filter `charts` shows; at least one training curve."""
    names = sorted(metric["key"] for metric in run["data"].get("metrics", []))
    training = [name for name in names if name.startswith(TRAINING_PREFIXES)]
    if not training:
        fail(
            f"run {run['info']['run_id']} has no training metrics "
            f"({', '.join(p + '*' for p in TRAINING_PREFIXES)}); it has: "
            f"{', '.join(names) or 'none'}"
        )
    pattern = re.compile(charts, re.IGNORECASE)  # as the UI's search reads it
    shown = [name for name in names if pattern.search(name)]
    if not any(name.startswith(TRAINING_PREFIXES) for name in shown):
        fail(
            f"--charts {charts!r} matches no training metric of the run; it has: "
            f"{', '.join(training)}"
        )
    return shown


# --- the browser -------------------------------------------------------------------------------


def browser(profile: Path) -> webdriver.Chrome:
    try:
        driver = chromium(
            WIDTH, 1000, "--hide-scrollbars", "--force-device-scale-factor=1", profile=profile
        )
    except WebDriverException as error:
        fail(
            f"cannot start headless Chromium ({error.msg}): apt-get install chromium "
            "chromium-driver"
        )
    setup = "".join(
        f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in LOCAL_STORAGE.items()
    )
    style = (
        f"document.addEventListener('DOMContentLoaded', () => {{"
        f"const s = document.createElement('style'); s.textContent = {json.dumps(HIDE_CSS)};"
        f"document.head.appendChild(s); }});"
    )
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": setup + style})
    return driver


def wait_for(
    driver: webdriver.Chrome,
    condition: Callable[[webdriver.Chrome], Any],
    what: str | Callable[[], str],
    timeout: float = 60,
) -> Any:
    """Poll `condition` until it returns something truthy; fail naming `what` (or what it
    returns then) after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = condition(driver)
        except WebDriverException:
            result = None
        if result:
            return result
        time.sleep(0.25)
    fail(
        f"timed out after {timeout:.0f} s waiting for {what() if callable(what) else what} "
        f"on {driver.current_url}"
    )


def settle(
    driver: webdriver.Chrome,
    script: str,
    what: str,
    ready: Callable[[Any], bool] = bool,
    quiet: float = 2,
) -> None:
    """Wait until `script`'s value is `ready` and has not changed for `quiet` seconds (charts
    drawn, layout done): the React app re-renders as its requests come back."""
    last, since = None, time.monotonic()

    def stable(d):
        nonlocal last, since
        value = d.execute_script(script)
        if value != last:
            last, since = value, time.monotonic()
        return ready(value) and time.monotonic() - since >= quiet

    wait_for(driver, stable, what)


SEARCH_BOX = "input[role=searchbox], input[placeholder*='Search metric']"
# Where each chart is and how many traces Plotly drew in it.
CHART_STATE = """return Array.from(document.querySelectorAll('.js-plotly-plot')).map(p => {
    const r = p.getBoundingClientRect();
    return [Math.round(r.top), Math.round(r.left), Math.round(r.height),
            p.querySelectorAll('.scatterlayer .trace, .barlayer .trace').length];
})"""


def charts_drawn(count: int) -> Callable[[Any], bool]:
    """`count` charts, each with a trace, for `settle` of CHART_STATE."""
    return lambda state: len(state) == count and all(chart[3] > 0 for chart in state)


def chart_titles(driver: webdriver.Chrome) -> list[str]:
    """The metric names of the chart cards (their h4 titles)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('h4[title]')).map(h => h.title)"
    )


def set_viewport(driver: webdriver.Chrome, height: int) -> None:
    """The page's viewport WIDTH x height CSS px (the window is larger by its frame)."""
    driver.set_window_size(WIDTH, height)
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    driver.set_window_size(2 * WIDTH - inner[0], 2 * height - inner[1])


def bottom_of(driver: webdriver.Chrome, css: str) -> int:
    """The lowest bottom edge (CSS px) of the elements matching css."""
    return int(
        driver.execute_script(
            "return Math.max(0, ...Array.from(document.querySelectorAll(arguments[0]))"
            ".map(e => e.getBoundingClientRect().bottom))",
            css,
        )
    )


def save_png(driver: webdriver.Chrome, out: Path, height: int) -> None:
    """The viewport's top `height` CSS px, WIDTH px wide, as a PNG under MAX_BYTES (a
    palette of 256 colours when the full colour one is larger)."""
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    if image.width != WIDTH:  # a device scale factor other than 1
        image = image.resize(
            (WIDTH, round(image.height * WIDTH / image.width)), Image.Resampling.LANCZOS
        )
    image = image.crop((0, 0, WIDTH, min(image.height, height)))
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)
    if out.stat().st_size > MAX_BYTES:
        image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            out, optimize=True
        )
    print(f"wrote {out} ({image.width}x{image.height}, {out.stat().st_size // 1000} KB)")


def shoot_run(
    driver: webdriver.Chrome, base: str, run: dict, charts: str, shown: list[str], out: Path
) -> str:
    info = run["info"]
    url = f"{base}/#/experiments/{info['experiment_id']}/runs/{info['run_id']}/model-metrics"
    set_viewport(driver, 1050)  # two rows of three charts
    driver.get(url)
    name = info.get("run_name") or info["run_id"]
    wait_for(
        driver,
        lambda d: (
            name in d.find_element(By.TAG_NAME, "h2").text
            if d.find_elements(By.TAG_NAME, "h2")
            else None
        ),
        f"the run name {name!r}",
    )
    wait_for(driver, lambda d: chart_titles(d), "the metric charts")

    def type_filter(d):  # the UI's chart search; again if React replaced the box meanwhile
        boxes = d.find_elements(By.CSS_SELECTOR, SEARCH_BOX)
        if not boxes:
            return False
        boxes[0].send_keys(Keys.CONTROL, "a")
        boxes[0].send_keys(charts)
        return boxes[0].get_attribute("value") == charts

    wait_for(driver, type_filter, "the chart search box")
    driver.find_element(By.CSS_SELECTOR, SEARCH_BOX).send_keys(Keys.TAB)  # no cursor in it
    wait_for(
        driver,
        lambda d: set(shown) <= set(chart_titles(d)),
        lambda: (
            f"the charts {', '.join(shown)} (shown: {', '.join(chart_titles(driver)) or 'none'})"
        ),
    )
    count = len(chart_titles(driver))  # the UI's search also keeps image charts, if any
    settle(driver, CHART_STATE, f"the {count} charts to be drawn", charts_drawn(count))
    height = bottom_of(driver, ".js-plotly-plot") + 60  # the legend under the last row
    if height > 1050:  # more rows than the window: make it taller, draw again
        set_viewport(driver, height + 40)
        settle(driver, CHART_STATE, "the charts to be drawn again", charts_drawn(count))
        height = bottom_of(driver, ".js-plotly-plot") + 60
    save_png(driver, out, height)
    return url


def shoot_version(driver: webdriver.Chrome, base: str, version: dict, run: dict, out: Path) -> str:
    number = version["version"]
    url = f"{base}/#/models/{urllib.parse.quote(MODEL)}/versions/{number}"
    set_viewport(driver, 900)
    driver.get(url)
    wait_for(
        driver,
        lambda d: (
            f"Version {number}" in d.find_element(By.TAG_NAME, "h2").text
            if d.find_elements(By.TAG_NAME, "h2")
            else None
        ),
        f"the heading 'Version {number}'",
    )
    aliases = sorted(version.get("aliases") or [ALIAS])
    for alias in aliases:
        wait_for(
            driver,
            lambda d, a=alias: d.find_elements(
                By.CSS_SELECTOR, f"[role=status][title={json.dumps(a)}]"
            ),
            f"the alias tag {alias!r}",
        )
    name = run["info"].get("run_name")
    if name and run["info"]["run_id"] == version.get("run_id"):
        wait_for(
            driver,
            lambda d: d.execute_script(
                "return Array.from(document.links).some("
                "a => a.innerText.replace(/\\s+/g, ' ').includes(arguments[0]))",
                name,
            ),
            f"the source run link {name!r}",
        )
    settle(driver, "return document.body.innerText.length", "the page to render")
    # Down to the end of the tags table (above the model's schema).
    tags = driver.find_elements(By.XPATH, "//*[normalize-space(text())='Schema']")
    height = (int(tags[0].rect["y"]) - 10) if tags else 720
    save_png(driver, out, max(300, min(height, 900)))
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "project",
        type=Path,
        nargs="?",
        default=ROOT,
        help="a project folder whose mlflow.db holds a finished `kedro run`",
    )
    parser.add_argument(
        "--run-id", default=None, help=f"the run to chart (default: the one of {MODEL}@{ALIAS})"
    )
    parser.add_argument(
        "--charts", default=CHARTS, help="regular expression over metric names: the charts to show"
    )
    parser.add_argument("--output-dir", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    database = args.project / "mlflow.db"
    if not database.is_file():
        fail(f"{database} not found: `kedro run` in {args.project} first")
    with tempfile.TemporaryDirectory(prefix="screenshot-mlflow-") as scratch:
        scratch = Path(scratch)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start_server(database, port, scratch / "server.log")
        driver = None
        try:
            version, run = find_version_and_run(base, args.run_id)
            shown = chart_metrics(run, args.charts)
            driver = browser(scratch / "profile")
            urls = [
                shoot_run(
                    driver, base, run, args.charts, shown, args.output_dir / "mlflow_run.png"
                ),
                shoot_version(driver, base, version, run, args.output_dir / "mlflow_model.png"),
            ]
        finally:
            if driver is not None:
                driver.quit()
            stop_server(server)
    for url in urls:
        print(url.replace(base, "http://127.0.0.1:<port>"))


if __name__ == "__main__":
    main()
