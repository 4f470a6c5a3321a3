"""The HTTP server (issue 5): answers, every kind of bad input, readiness, a load test;
overload, timeouts and SIGTERM (issue 12)."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from caption_pipeline.errors import DataError
from caption_pipeline.params import from_conf
from caption_pipeline.serving.server import (
    MicroBatcher,
    Overloaded,
    RequestTimeout,
    ServeSettings,
    check_settings,
    create_app,
)
from tests.helpers import free_port, start_server, stop_server


def _png(size=(64, 48), colour="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _expected(exported, jpeg: bytes, beam_size: int) -> tuple[str, list[float]]:
    out = exported.caption([jpeg], beam_size)
    return out["caption"][0], [float(s) for s in out["scores"][0] if np.isfinite(s)]


def test_health_and_readiness(caption_server):
    assert requests.get(f"{caption_server}/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{caption_server}/readyz", timeout=10).json()
    assert ready["status"] == "ready" and ready["max_beam_size"] == 5


def test_multipart_and_raw_uploads_answer_the_models_caption(caption_server, exported, test_jpegs):
    jpeg = test_jpegs[1][0]
    caption, scores = _expected(exported, jpeg, 2)
    multipart = requests.post(
        f"{caption_server}/v1/caption",
        params={"beam_size": 2},
        files={"image": ("a.jpg", jpeg, "image/jpeg")},
        timeout=60,
    )
    raw = requests.post(
        f"{caption_server}/v1/caption?beam_size=2&attention=true",
        data=jpeg,
        headers={"Content-Type": "image/jpeg"},
        timeout=60,
    )
    for answer in (multipart, raw):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["caption"] == caption and body["beam_size"] == 2
        np.testing.assert_allclose([b["score"] for b in body["beams"]], scores, atol=1e-3)
    assert "attention" not in multipart.json()
    attention = raw.json()["attention"]
    grid = exported.info["grid"]
    assert attention["grid"] == grid and attention["words"][-1] == "<end>"
    maps = np.asarray(attention["maps"])
    assert maps.shape == (len(attention["words"]), *grid)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-3)  # softmax over regions


def _bomb() -> bytes:
    """A 10000 x 6000 PNG (60 MP) of a few KB: refused from its header."""
    buffer = io.BytesIO()
    Image.new("1", (10000, 6000)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


BAD_REQUESTS = {
    # name: (request kwargs, expected status, expected error code)
    "not_an_image": (
        dict(data=b"hello, not an image", headers={"Content-Type": "image/jpeg"}),
        400,
        "not_an_image",
    ),
    "truncated": ("truncated", 400, "truncated"),
    "empty_body": (dict(data=b"", headers={"Content-Type": "image/png"}), 400, "empty"),
    "empty_file": (dict(files={"image": ("e.png", b"", "image/png")}), 400, "empty"),
    "wrong_content_type": (
        dict(data=b"{}", headers={"Content-Type": "application/json"}),
        415,
        "unsupported_content_type",
    ),
    "no_content_type": (
        dict(data=b"abc", headers={"Content-Type": ""}),
        415,
        "unsupported_content_type",
    ),
    "multipart_without_image": (
        dict(files={"photo": ("a.png", _png(), "image/png")}),
        400,
        "missing_image",
    ),
    "over_size_limit": (
        dict(
            data=b"\xff\xd8\xff" + bytes(11 * 1024 * 1024), headers={"Content-Type": "image/jpeg"}
        ),
        413,
        "upload_too_large",
    ),
    "decompression_bomb": ("bomb", 413, "too_large"),
    "beam_size_too_large": (
        dict(params={"beam_size": 6}, files={"image": ("a.png", _png())}),
        400,
        "bad_beam_size",
    ),
    "beam_size_zero": (
        dict(params={"beam_size": 0}, files={"image": ("a.png", _png())}),
        400,
        "bad_beam_size",
    ),
    "beam_size_not_a_number": (
        dict(data={"beam_size": "three"}, files={"image": ("a.png", _png())}),
        400,
        "bad_beam_size",
    ),
    "bad_attention_flag": (
        dict(params={"attention": "maybe"}, files={"image": ("a.png", _png())}),
        400,
        "bad_attention",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving(
    caption_server, test_jpegs, case
):
    kwargs, status, code = BAD_REQUESTS[case]
    if kwargs == "truncated":
        kwargs = dict(data=test_jpegs[1][0][:1500], headers={"Content-Type": "image/jpeg"})
    elif kwargs == "bomb":
        kwargs = dict(files={"image": ("bomb.png", _bomb(), "image/png")})
    answer = requests.post(f"{caption_server}/v1/caption", timeout=60, **kwargs)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code and error["message"]
    good = requests.post(
        f"{caption_server}/v1/caption", files={"image": ("ok.png", _png())}, timeout=60
    )
    assert good.status_code == 200, good.text


def test_other_methods_and_paths_are_json_errors(caption_server):
    assert requests.get(f"{caption_server}/v1/caption", timeout=10).status_code == 405
    missing = requests.get(f"{caption_server}/nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_web_page_is_self_contained(caption_server):
    page = requests.get(f"{caption_server}/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert "/v1/caption" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN, no internet


def test_load_400_requests_from_8_clients_all_correct(caption_server, exported, test_jpegs):
    """8 concurrent clients, 400 requests over the test images and beam sizes 1..3: every
    answer is 200 and is the model's answer for that very image (no mix-ups in batches)."""
    # Images whose answers differ (the beam-3 scores), so that a caption answered for the
    # wrong image is caught.
    jpegs, seen = [], set()
    for jpeg in test_jpegs[1]:
        key = tuple(round(score, 3) for score in _expected(exported, jpeg, 3)[1])
        if key not in seen and len(jpegs) < 12:
            seen.add(key)
            jpegs.append(jpeg)
    assert len(jpegs) >= 8
    cases = [(i % len(jpegs), 1 + (i // len(jpegs)) % 3) for i in range(400)]
    expected = {(j, k): _expected(exported, jpegs[j], k) for j, k in set(cases)}
    assert len(expected) == 3 * len(jpegs)
    session = threading.local()

    def ask(case):
        image, beam = case
        if not hasattr(session, "http"):
            session.http = requests.Session()
        answer = session.http.post(
            f"{caption_server}/v1/caption",
            params={"beam_size": beam},
            files={"image": ("t.jpg", jpegs[image], "image/jpeg")},
            timeout=120,
        )
        return case, answer.status_code, answer.json()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, cases))
    statuses = [status for _, status, _ in results]
    assert statuses.count(200) == 400, sorted(set(statuses))
    for case, _, body in results:
        caption, scores = expected[case]
        assert body["caption"] == caption
        np.testing.assert_allclose([b["score"] for b in body["beams"]], scores, atol=1e-3)


# --- without a server process -------------------------------------------------------------------


class _FakeModel:
    """Stands in for ExportedCaptioner: echoes each image's length as its score."""

    default_beam_size, max_beam_size = 2, 3
    path = "fake"
    info = {"grid": [1, 1], "image_size": 8, "default_beam_size": 2, "max_beam_size": 3}

    def __init__(self):
        self.batches = []

    def caption(self, images, beam_size):
        self.batches.append((len(images), beam_size))
        b = len(images)
        return {
            "caption": np.array([f"len {len(x)}" for x in images], object),
            "captions": np.array([[f"len {len(x)}"] * beam_size for x in images], object),
            "scores": np.array([[float(len(x))] * beam_size for x in images]),
            "log_probs": np.zeros((b, beam_size)),
            "lengths": np.ones((b, beam_size), int),
            "tokens": np.full((b, beam_size, 1), "<end>", object),
            "attention": np.ones((b, beam_size, 1, 1, 1)),
        }


def test_readiness_waits_for_the_model():
    release = threading.Event()
    model = _FakeModel()

    def load():
        release.wait(30)
        return model

    client = create_app(load, from_conf(ServeSettings, "serve")).test_client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503
    loading = client.post("/v1/caption", data=_png(), content_type="image/png")
    assert loading.status_code == 503 and loading.json["error"]["code"] == "not_ready"
    release.set()
    for _ in range(100):
        if client.get("/readyz").status_code == 200:
            break
        threading.Event().wait(0.05)
    answer = client.post("/v1/caption", data=_png(), content_type="image/png")
    assert answer.status_code == 200 and answer.json["caption"] == f"len {len(_png())}"


def test_micro_batcher_batches_by_beam_size_and_keeps_answers_apart():
    model = _FakeModel()
    batcher = MicroBatcher(model.caption, max_batch=4, wait_ms=50)
    images = [bytes(n) for n in range(1, 13)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: (i, batcher.submit(images[i], 1 + i % 2)), range(12)))
    for i, (outputs, index) in answers:
        assert outputs["caption"][index] == f"len {i + 1}"
        assert outputs["captions"].shape[1] == 1 + i % 2
    assert max(size for size, _ in model.batches) > 1  # some requests shared a call
    assert all(size <= 4 for size, _ in model.batches)


def test_micro_batcher_hands_model_errors_to_the_requests():
    def broken(images, beam_size):
        raise RuntimeError("model failed")

    batcher = MicroBatcher(broken, max_batch=4, wait_ms=1)
    with pytest.raises(RuntimeError, match="model failed"):
        batcher.submit(b"x", 1)


def _captions_after(model, wait):
    """`model`'s captions, each model call first running `wait()`."""

    def caption(images, beam_size):
        wait()
        return model.caption(images, beam_size)

    return caption


def test_micro_batcher_sheds_past_max_queue_at_once():
    release = threading.Event()
    blocked = _captions_after(_FakeModel(), lambda: release.wait(30))
    batcher = MicroBatcher(blocked, max_batch=1, wait_ms=0, max_queue=2)
    with ThreadPoolExecutor(2) as pool:
        admitted = [pool.submit(batcher.submit, bytes(n), 1) for n in (1, 2)]
        while batcher.pending < 2:
            time.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(Overloaded) as shed:
            batcher.submit(b"3", 1)
        assert time.monotonic() - started < 0.5  # answered at once, not after the queue
        assert shed.value.status == 503 and int(shed.value.headers["Retry-After"]) >= 1
        release.set()
        assert [f.result(timeout=30)[0]["caption"][0] for f in admitted] == ["len 1", "len 2"]
    assert batcher.pending == 0


def test_micro_batcher_times_out_and_drops_requests_not_started():
    model = _FakeModel()
    slow = _captions_after(model, lambda: time.sleep(0.5))
    batcher = MicroBatcher(slow, max_batch=1, wait_ms=0, timeout_s=0.2)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(batcher.submit, b"1", 1)
        time.sleep(0.05)
        queued = pool.submit(batcher.submit, b"22", 1)  # waits behind the first, times out
        for future in (running, queued):
            with pytest.raises(RequestTimeout):
                future.result(timeout=30)
    for _ in range(100):
        if batcher.pending == 0:
            break
        time.sleep(0.05)
    assert batcher.pending == 0 and model.batches == [(1, 1)]  # the second was never run


def test_timeout_is_a_504_json_error():
    model = _FakeModel()
    caption = model.caption
    model.caption = lambda images, beam: (time.sleep(0.3), caption(images, beam))[1]
    client = create_app(
        lambda: model, from_conf(ServeSettings, "serve", request_timeout_s=0.1)
    ).test_client()
    for _ in range(200):
        if client.get("/readyz").status_code == 200:
            break
        time.sleep(0.05)
    answer = client.post("/v1/caption", data=_png(), content_type="image/png")
    assert answer.status_code == 504 and answer.json["error"]["code"] == "timeout"
    assert "request_timeout_s" in answer.json["error"]["message"]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(threads=8, max_queue=32), "serve.threads (8) must be greater than serve.max_queue"),
        (dict(max_queue=0), "serve.max_queue must be an integer >= 1"),
        (dict(request_timeout_s=0), "serve.request_timeout_s must be a number > 0"),
        (dict(drain_timeout_s=-1), "serve.drain_timeout_s must be a number > 0"),
    ],
)
def test_bad_overload_settings_are_named(change, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_settings(from_conf(ServeSettings, "serve", **change))


# --- overload and SIGTERM on a real server process (a fake model with a fixed call time) --------

SLOW_SERVER = """
import sys, time
sys.path.insert(0, {tests!r})
from test_serve import _FakeModel
from caption_pipeline.serving.server import ServeSettings, serve
from caption_pipeline.params import from_conf

class SlowModel(_FakeModel):
    def caption(self, images, beam_size):
        time.sleep({call_s} + {image_s} * len(images))  # a model call: fixed cost + per image
        return super().caption(images, beam_size)

serve(SlowModel, from_conf(ServeSettings, "serve",
                           port={port}, threads={threads}, max_queue={max_queue},
                           max_batch=8, batch_wait_ms=5, drain_timeout_s=10))
"""


def _slow_server(call_s: float, image_s: float, threads: int, max_queue: int):
    """A `server.serve` process on 127.0.0.1 whose model call takes call_s + image_s * batch
    seconds (sleeping, so timing does not depend on the shared CPUs): (url, process)."""
    port = free_port()
    script = SLOW_SERVER.format(
        tests=str(Path(__file__).parent),
        call_s=call_s,
        image_s=image_s,
        port=port,
        threads=threads,
        max_queue=max_queue,
    )
    url = f"http://127.0.0.1:{port}"
    return url, start_server([sys.executable, "-c", script], Path.cwd(), f"{url}/readyz")


def _timed_post(http, url: str) -> tuple[int, float, requests.Response]:
    started = time.perf_counter()
    answer = http.post(
        f"{url}/v1/caption", data=_png(), headers={"Content-Type": "image/png"}, timeout=60
    )
    return answer.status_code, time.perf_counter() - started, answer


def test_64_clients_get_200_or_a_fast_503_and_the_queue_stays_bounded():
    """64 clients x 4 requests against a queue of 16: every answer is a 200 or a 503
    `overloaded` with Retry-After, nothing else, and the pending requests that /readyz reports
    never exceed the queue's bound. That bound is what keeps an admitted request's wait near
    max_queue / max_batch + 1 model calls (an unbounded queue would grow with the clients:
    64 / 8 model calls); it is checked by count, not by a clock, so a busy machine cannot
    fail it."""
    url, process = _slow_server(call_s=0.02, image_s=0.005, threads=80, max_queue=16)
    depths, done = [], threading.Event()

    def watch():
        with requests.Session() as http:
            while not done.is_set():
                depths.append(http.get(f"{url}/readyz", timeout=10).json()["queued"])

    try:
        watcher = threading.Thread(target=watch)
        watcher.start()
        local = threading.local()

        def client(_):
            if not hasattr(local, "http"):
                local.http = requests.Session()
            return _timed_post(local.http, url)

        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(client, range(256)))
        done.set()
        watcher.join(timeout=30)
    finally:
        done.set()
        stop_server(process)
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    ok = [seconds for status, seconds, _ in results if status == 200]
    shed = [(seconds, answer) for status, seconds, answer in results if status == 503]
    assert ok and shed, (len(ok), len(shed))  # the queue filled, and it still served
    for _, answer in shed:
        assert answer.json()["error"]["code"] == "overloaded"
        assert int(answer.headers["Retry-After"]) >= 1
    # Fast: a shed request does not wait for the model, so it beats the typical admitted one.
    assert np.median([seconds for seconds, _ in shed]) < np.median(ok)
    assert depths and max(depths) <= 16, (len(depths), max(depths, default=None))
    assert max(depths) > 0  # the watcher saw the load, not only an idle server


def test_sigterm_finishes_in_flight_requests_and_exits_0():
    url, process = _slow_server(call_s=0.5, image_s=0.01, threads=40, max_queue=32)
    try:
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(_timed_post, requests, url) for _ in range(12)]
            deadline = time.monotonic() + 30
            while requests.get(f"{url}/readyz", timeout=10).json()["queued"] < 12:
                assert time.monotonic() < deadline, "the requests never reached the queue"
                time.sleep(0.02)
            os.killpg(process.pid, signal.SIGTERM)
            signalled = time.monotonic()
            refused = False
            while not refused and time.monotonic() < signalled + 5:
                try:
                    requests.get(f"{url}/healthz", timeout=2)
                except requests.ConnectionError:
                    refused = True  # no new connections once draining
                time.sleep(0.02)
            answers = [future.result(timeout=60) for future in futures]
            statuses = [status for status, _, _ in answers]
        assert refused
        assert statuses == [200] * 12, answers[0][2].text
        assert process.wait(timeout=15) == 0, process.stdout.read()[-3000:]
        assert time.monotonic() - signalled < 12  # drain_timeout_s 10 bounds it
    finally:
        if process.poll() is None:
            stop_server(process)
