"""The web page in a real headless browser (issue 5): Debian's chromium and chromedriver,
driven by Selenium (tests.helpers.chromium). `make test` installs them when /usr/bin/chromium is
missing."""

from __future__ import annotations

from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.helpers import CHROMIUM, caption_in_page, chromium

# Alpha of the overlay's pixels: > 0 once a word's attention map is drawn.
OVERLAY_ALPHA = """
const canvas = document.getElementById("overlay");
const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
let total = 0; for (let i = 3; i < data.length; i += 4) total += data[i];
return total;"""


def test_web_page_captions_an_upload_and_shows_attention(
    caption_server, smoke_project, exported, tmp_path
):
    assert CHROMIUM, "apt-get install chromium chromium-driver (make test)"
    image = sorted((smoke_project / "data/01_raw/shapes/test").glob("*.jpg"))[0]
    expected = exported.caption([image.read_bytes()])
    driver = chromium(1100, 900, profile=tmp_path / "profile")
    try:
        caption_in_page(driver, f"{caption_server}/", image)
        caption = driver.find_element(By.ID, "caption").text
        assert caption == (expected["caption"][0] or "(empty caption)")
        beams = driver.find_elements(By.CSS_SELECTOR, "#beams li")
        assert len(beams) == expected["captions"].shape[1]
        words = driver.find_elements(By.CSS_SELECTOR, ".word")
        assert [w.text for w in words] == [
            t for t in expected["tokens"][0, 0] if t
        ]  # the best beam's words and <end>
        assert driver.execute_script(OVERLAY_ALPHA) > 0
        # Hover the last word, then step back with the arrow key: the overlay follows.
        ActionChains(driver).move_to_element(words[-1]).perform()
        overlay = driver.find_element(By.ID, "overlay")
        assert overlay.get_attribute("data-word") == str(len(words) - 1)
        assert "active" in words[-1].get_attribute("class")
        driver.find_element(By.TAG_NAME, "body").send_keys("\ue012")  # ArrowLeft
        expected_word = str(max(len(words) - 2, 0) if len(words) > 1 else 0)
        assert overlay.get_attribute("data-word") == expected_word
        screenshot = tmp_path / "web_page.png"
        assert driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000
    finally:
        driver.quit()


def test_web_page_shows_a_bad_upload_as_an_error(caption_server, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    driver = chromium(1100, 900, profile=tmp_path / "profile")
    try:
        driver.get(f"{caption_server}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#beam option"))
        driver.find_element(By.ID, "file").send_keys(str(bad))
        wait.until(lambda d: "error" in d.find_element(By.ID, "status").get_attribute("class"))
        assert driver.find_element(By.ID, "status").text.startswith("400:")
    finally:
        driver.quit()
