"""Test helpers that are not fixtures: `from tests.helpers import ...` (tests/conftest.py holds
the fixtures). The standard library and Selenium only, no pytest: docs/screenshot_*.py use the
server and browser helpers too (`pip install -e ".[docs]"`)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

KEDRO = str(Path(sys.executable).with_name("kedro"))
GIT_ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}


def spawn(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """`args` in a session of its own (so that killing its group kills its children too), its
    stdout and stderr together in one text pipe."""
    return subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def gone_pid() -> int:
    """The process id of a process that has exited: what a killed writer's temporary holds
    (`atomic.temp_sibling`), so that the cleanup treats it as a leftover."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout)


def git(repo: Path, *args: str) -> str:
    """`git ARGS` in `repo` as a test user; raises with git's output on failure."""
    done = subprocess.run(
        ["git", *args], cwd=repo, env={**os.environ, **GIT_ENV}, capture_output=True, text=True
    )
    assert done.returncode == 0, f"git {args}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


def clone_working_tree(dest: Path, root: Path | None = None) -> Path:
    """A git repository of one commit holding the project at `root` (default: this checkout)
    as a fresh clone of its working tree would: committed or new files, never what .gitignore
    keeps out nor what a run wrote there (`project.source_files`)."""
    from caption_pipeline.project import PROJECT_ROOT, source_files

    root = root or PROJECT_ROOT
    for name in source_files(root):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest / name)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "clone")
    return dest


def run_kedro(project: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`kedro ARGS` in `project`, capturing output; never raises on a non-zero exit."""
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [KEDRO, *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout
    )


# --- export and serving (issue 5) ---------------------------------------------------------------

EXPORT_DIR = Path("data/06_models/export/saved_model")  # the catalog's exported_model, relative


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    """Poll `url` until it answers 200; fail with the process's output if it dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"server exited with {process.returncode}: "
                f"{process.stdout.read()[-3000:] if process.stdout else ''}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer 200 within {timeout} s")


def start_server(args: list[str], cwd: Path, ready_url: str, env: dict | None = None):
    """A server process (new session, output to a pipe), once `ready_url` answers 200."""
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **(env or {}),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    process = spawn(args, cwd, env)
    try:
        wait_for_http(ready_url, process)
    except BaseException:
        stop_server(process)
        raise
    return process


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 20 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# --- headless Chromium (tests/test_serve_browser.py, docs/screenshot_*.py) ----------------------

# Debian's chromium and chromedriver (`apt-get install chromium chromium-driver`; `make test`
# installs them); None where they are not on PATH.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
HEADLESS_FLAGS = (
    "--headless",  # no display
    "--no-sandbox",  # Chromium's sandbox cannot start as root in a container
    "--disable-gpu",  # software rendering: no GPU needed, the same pixels on every machine
    "--disable-quic",  # no HTTP/3 (QUIC over UDP) attempts: plain HTTP to 127.0.0.1
    "--no-first-run",  # no first-run dialog or default-browser check
    "--disable-background-networking",  # no requests to Google's services in the background
    "--disable-component-update",  # nor component downloads
    "--disable-sync",  # nor account sync
    "--disable-dev-shm-usage",  # shared memory in /tmp: Docker's /dev/shm is 64 MB
)


def chromium(width: int, height: int, *flags: str, profile: Path | None = None) -> webdriver.Chrome:
    """Headless Chromium through Selenium, its window `width` x `height` px, with HEADLESS_FLAGS
    and `flags` (e.g. "--hide-scrollbars" for a screenshot), its profile in `profile` (else a
    temporary one). Debian's chromium and chromedriver when on PATH; else Selenium Manager
    looks for a browser (and may download one)."""
    options = webdriver.ChromeOptions()
    for flag in (*HEADLESS_FLAGS, f"--window-size={width},{height}", *flags):
        options.add_argument(flag)
    if profile is not None:
        options.add_argument(f"--user-data-dir={profile}")
    if CHROMIUM:
        options.binary_location = CHROMIUM
    return webdriver.Chrome(
        service=Service(CHROMEDRIVER) if CHROMEDRIVER else None, options=options
    )


def caption_in_page(driver: webdriver.Chrome, url: str, image: Path, timeout: float = 60):
    """Open the server's web page, choose `image`, wait for the caption and the word chips."""
    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#beam option"))  # /readyz answered
    driver.find_element(By.ID, "file").send_keys(str(image))
    wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".word")))
    wait.until(lambda d: d.find_element(By.ID, "overlay").get_attribute("data-word") == "0")
    return wait


def kill_9_when(child, ready, *, timeout: float, what: str) -> None:
    """SIGKILL `child` (started with start_new_session=True) once `ready()` is true."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert child.poll() is None and time.monotonic() < deadline, (
                f"{what} ended before it was killed"
            )
            time.sleep(0.01)
        os.killpg(child.pid, signal.SIGKILL)
    finally:
        child.wait()
