"""Make docs/web_page.png: the server's web page with a captioned test image and the attention
of one word, in headless Chromium (tests/helpers.py's, as tests/test_serve_browser.py).

  .venv/bin/python docs/screenshot_web_page.py [PROJECT] [--image FILE] [--word N]

PROJECT (default: this project) must hold an export (`kedro run`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for `tests.helpers`: `python docs/X.py` puts docs/ on the path

from tests.helpers import caption_in_page, chromium, free_port, start_server, stop_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("project", type=Path, nargs="?", default=ROOT)
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument("--word", type=int, default=4, help="the word whose attention is shown")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "web_page.png")
    args = parser.parse_args()
    image = args.image or sorted((args.project / "data/01_raw/shapes/test").glob("*.jpg"))[0]
    port = free_port()
    server = start_server(
        [str(Path(sys.executable).with_name("caption-pipeline")), "serve", "--port", str(port)],
        args.project,
        f"http://127.0.0.1:{port}/readyz",
    )
    try:
        with tempfile.TemporaryDirectory() as profile:
            driver = chromium(1100, 900, profile=Path(profile))
            try:
                caption_in_page(driver, f"http://127.0.0.1:{port}/", image.resolve())
                words = driver.find_elements(By.CSS_SELECTOR, ".word")
                ActionChains(driver).move_to_element(
                    words[min(args.word, len(words) - 1)]
                ).perform()
                driver.save_screenshot(str(args.output))
            finally:
                driver.quit()
    finally:
        stop_server(server)
    print(args.output)


if __name__ == "__main__":
    main()
