"""`mmcap serve`: a real server process on 127.0.0.1, called over HTTP; the page in headless
Chromium; the batcher and the option parsing in-process."""
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from helpers import CAPTIONS, tiny_config

slow = pytest.mark.slow  # the tests that start a server process

UPLOAD_LIMIT = 256 * 1024  # the server runs with --max-upload-mb 0.25
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]


def chromium_or_skip() -> str:
    """Debian's chromium for the page tests: skipped without it, except on CI, which must have it."""
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: .ci/run installs Debian's chromium")
        pytest.skip("needs Debian's chromium (apt-get install -y chromium)")
    return chromium


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, the same model loaded here) for a server of the tiny GPT-2 model."""
    from mmcap import Captioner

    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("serve") / "model"
    Captioner.from_config(tiny_config("gpt2"), captions=CAPTIONS).save_pretrained(model_dir)
    port = free_port()
    # a long batch window, so that concurrent test requests meet in one batch
    server = subprocess.Popen(
        [sys.executable, "-m", "mmcap.cli", "serve", "--model", str(model_dir), "--port", str(port),
         "--batch-timeout", "0.3", "--max-upload-mb", str(UPLOAD_LIMIT / 2**20)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health").json() == {"status": "ok"}:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.3)
        yield url, Captioner.from_pretrained(model_dir)
    finally:
        server.terminate()
        server.wait(30)


def post(url, path, **fields):
    """POST /caption with multipart form data: the image file at `path` plus option fields."""
    with open(path, "rb") as f:
        return httpx.post(f"{url}/caption", files={"image": f}, data={k: str(v) for k, v in fields.items()},
                          timeout=120)


@slow
def test_captions_equal_offline_captions(served, image_files):
    url, model = served
    for path in image_files[:2]:
        caption, log_prob = model.caption(str(path), return_scores=True)
        assert post(url, path).json() == {"caption": caption, "log_prob": pytest.approx(float(log_prob), abs=1e-5)}
        as_json = httpx.post(f"{url}/caption", json={"image": base64.b64encode(path.read_bytes()).decode()}).json()
        assert as_json["caption"] == caption

    # beam search with attention: the alternatives, the words and one (H, W) map per word
    path = image_files[2]
    offline = model.caption_details(str(path), num_beams=3, max_new_tokens=6, return_attention=True)[0]
    got = post(url, path, num_beams=3, max_new_tokens=6, attention="true").json()
    assert got["caption"] == offline.caption
    assert [a["caption"] for a in got["alternatives"]] == [c for c, _ in offline.alternatives]
    assert got["alternatives"][0]["caption"] == got["caption"]
    # each alternative's ranking score (log_prob / tokens ** length_penalty), best first
    penalty = got["length_penalty"]
    assert got["alternatives"][0]["tokens"] == len(got["words"])
    for alt in got["alternatives"]:
        assert alt["score"] == pytest.approx(alt["log_prob"] / alt["tokens"] ** penalty)
    assert [a["score"] for a in got["alternatives"]] == sorted((a["score"] for a in got["alternatives"]), reverse=True)
    assert got["words"] == offline.words
    torch.testing.assert_close(torch.tensor(got["attention"]), offline.attention, atol=1e-4, rtol=0)


@slow
def test_concurrent_requests_batch_by_options(served, image_files):
    url, model = served
    jobs = [(path, beams) for beams in (1, 2) for path in image_files]  # 2 option groups of 4
    jobs += [(image_files[0], "sample"), (image_files[1], "sample")]

    def call(job):
        path, beams = job
        fields = {"do_sample": "true", "max_new_tokens": 4} if beams == "sample" else {"num_beams": beams}
        r = post(url, path, **fields)
        return r.json()["caption"], int(r.headers["x-batch-size"])

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(call, jobs))
    sizes = [size for _, size in answers]
    assert max(sizes) > 1, f"no batching: batch sizes {sizes}"
    assert all(size <= 4 for size in sizes)  # never a batch across option groups
    assert sizes[-2:] == [1, 1]  # sampled captions depend on their batch's draws: each runs alone
    for (path, beams), (caption, _) in zip(jobs[:8], answers):
        assert caption == model.caption(str(path), num_beams=beams)


def truncated_jpeg(path: Path) -> bytes:
    return path.read_bytes()[:300]


def bomb_png() -> bytes:
    """A valid PNG header claiming 20000 x 20000 pixels: only the header is ever read."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@slow
@pytest.mark.parametrize("upload, status, error", [
    (lambda f: b"", 400, "empty_file"),
    (lambda f: b"this is not an image", 415, "unreadable_image"),
    (lambda f: truncated_jpeg(f[0]), 415, "unreadable_image"),
    (lambda f: bomb_png(), 413, "too_large"),
    (lambda f: b"\xff" * (UPLOAD_LIMIT + 1), 413, "upload_too_large"),
])
def test_bad_uploads_get_4xx_naming_the_reason(served, image_files, upload, status, error):
    url, _ = served
    r = httpx.post(f"{url}/caption", files={"image": ("x.jpg", upload(image_files))})
    assert (r.status_code, r.json()["error"]) == (status, error)


@slow
@pytest.mark.parametrize("fields, error", [
    ({"num_beams": "100000"}, "num_beams: at most 8"),
    ({"max_new_tokens": "-5"}, "max_new_tokens must be >= 1"),
    ({"num_beams": "three"}, "num_beams: cannot parse 'three'"),
    ({"temperature": "nan"}, "temperature: expected a finite number"),
    ({"do_sample": "maybe"}, "do_sample: cannot parse"),
    ({"num_beam": "3"}, "num_beam: unknown option"),
])
def test_bad_options_get_422(served, image_files, fields, error):
    url, _ = served
    r = post(url, image_files[0], **fields)
    assert r.status_code == 422 and error in r.json()["detail"]


@slow
@pytest.mark.parametrize("body, status, error", [
    ({"image": "https://example.com/cat.jpg"}, 422, "url_not_fetched"),
    ({"image": "not base64!"}, 422, "invalid_base64"),
    ({"picture": "AAAA"}, 422, "missing_image"),
    ({"image": base64.b64encode(bomb_png()).decode(), "num_beams": 2.5}, 422, "invalid_option"),
    ({"image": base64.b64encode(bomb_png()).decode(), "num_beams": True}, 422, "invalid_option"),
])
def test_bad_json_requests(served, body, status, error):
    url, _ = served
    r = httpx.post(f"{url}/caption", json=body)
    assert (r.status_code, r.json()["error"]) == (status, error)


@slow
def test_other_bad_requests(served, image_files):
    url, _ = served
    r = httpx.post(f"{url}/caption", content=b"{not json", headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]) == (400, "invalid_json")
    r = httpx.post(f"{url}/caption", content=b"raw bytes", headers={"content-type": "image/jpeg"})
    assert (r.status_code, r.json()["error"]) == (415, "unsupported_media_type")
    r = httpx.post(f"{url}/caption", data={"num_beams": "2"}, files={"other": ("a", b"x")})
    assert (r.status_code, r.json()["error"]) == (422, "missing_image")
    assert post(url, image_files[0]).status_code == 200  # and the server is still fine


def raw_request(url: str, head: bytes, body_chunks) -> bytes:
    """Send a request by hand (headers, then body chunks until the server stops reading) and
    return the status line of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head)
        try:
            for chunk in body_chunks:
                s.sendall(chunk)
        except OSError:  # the server answered and closed: it will not read the rest
            pass
        return s.makefile("rb").readline()


@slow
def test_oversized_upload_is_refused_unread(served):
    url, _ = served
    form = b"multipart/form-data; boundary=x"
    # a declared 1 GB body is refused from its headers: nothing more is read
    head = b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: " + form + b"\r\nContent-Length: 1000000000\r\n\r\n"
    started = time.monotonic()
    assert raw_request(url, head, [b"\0" * 65536]).startswith(b"HTTP/1.1 413")
    # a chunked upload without a length is refused once it passes the limit (64 MB never sent)
    head = b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: " + form + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"10000\r\n" + b"\0" * 0x10000 + b"\r\n"
    assert raw_request(url, head, (chunk for _ in range(1000))).startswith(b"HTTP/1.1 413")
    assert time.monotonic() - started < 30


@slow
def test_openapi_schema_and_page_assets(served):
    url, _ = served
    schema = httpx.get(f"{url}/openapi.json").json()
    body = schema["paths"]["/caption"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert body["multipart/form-data"]["schema"]["properties"]["num_beams"] == {"type": "integer", "maximum": 8}
    assert "caption" in json.dumps(schema["components"]["schemas"]["CaptionResponse"])
    for asset in ("/", "/static/app.js", "/static/style.css"):
        r = httpx.get(url + asset)
        assert r.status_code == 200
        assert "http://" not in r.text and "https://" not in r.text  # no CDN: the page works offline


@slow
def test_page_shows_caption_and_heatmap(served, image_files, tmp_path):
    """Upload an image, wait for the caption, hover a word, check its heatmap is drawn, screenshot.
    `MMCAP_SERVE_SCREENSHOT=path` also saves the screenshot there (the README's docs/serve.png)."""
    url, model = served
    chromium = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 820, "height": 620})
            page.goto(url)
            page.set_input_files("#file", str(image_files[0]))
            page.wait_for_selector("#caption .word", timeout=60_000)
            offline = model.caption(str(image_files[0]), num_beams=3)
            assert page.inner_text("#alternatives li >> nth=0").startswith(offline or "(empty)")
            # beam search ranks by log-prob / tokens^length_penalty, not by the raw log-prob shown:
            # the page says so, and labels each figure it shows
            assert "best first by score = log-prob ÷ tokens^" in page.inner_text("#ranking")
            rows = page.locator("#alternatives li").all_inner_texts()
            assert len(rows) > 1 and all("log-prob " in row for row in rows)
            shown = page.eval_on_selector_all("#alternatives .score b", "els => els.map((e) => Number(e.textContent))")
            assert len(shown) == len(rows) and shown == sorted(shown, reverse=True)  # best first by the ranking score
            page.hover("#caption .word >> nth=1")
            page.wait_for_function("document.getElementById('heatmap').dataset.word === '1'")
            painted = page.evaluate("""() => {
                const c = document.getElementById('heatmap');
                const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0;
                for (let i = 3; i < px.length; i += 4) n += px[i] > 0;
                return n / (c.width * c.height);
            }""")
            assert painted == 1.0  # the map covers the whole image square
            page.screenshot(path=str(tmp_path / "serve.png"))
            if os.environ.get("MMCAP_SERVE_SCREENSHOT"):
                shutil.copy(tmp_path / "serve.png", os.environ["MMCAP_SERVE_SCREENSHOT"])
        finally:
            browser.close()
    assert (tmp_path / "serve.png").stat().st_size > 10_000


@slow
def test_page_shows_the_ranking_score_beside_the_log_prob(served, image_files):
    """A response that carries each alternative's ranking score (and its tokens): the page lists
    them best first by that score, labelled, beside the raw log-probability, also labelled. The
    issue's case: log-probs -2.56, -2.58, -2.30 where the last is shortest and ranks last."""
    url, _ = served
    chromium = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    alternatives = [{"caption": c, "log_prob": lp, "tokens": n, "score": lp / n}
                    for c, lp, n in (("a red circle on the left", -2.56, 7), ("a red circle at the left", -2.58, 7),
                                     ("a red circle", -2.30, 4))]
    words = "a red circle on the left".split() + [""]
    body = {"caption": alternatives[0]["caption"], "log_prob": -2.56, "length_penalty": 1.0,
            "alternatives": alternatives, "words": words, "attention": [[[0.25, 0.25], [0.25, 0.25]]] * len(words)}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.route("**/caption", lambda route: route.fulfill(json=body))
            page.goto(url)
            page.set_input_files("#file", str(image_files[0]))
            page.wait_for_selector("#alternatives li")
            assert page.inner_text("#ranking").startswith("best first by score = log-prob ÷ tokens^1")
            rows = page.locator("#alternatives li").all_inner_texts()
            assert [r.split(" score ")[0] for r in rows] == [a["caption"] for a in alternatives]
            for row, alt in zip(rows, alternatives):
                assert f"score {alt['score']:.3f}" in row and f"log-prob {alt['log_prob']:.2f}" in row
                assert f"tokens {alt['tokens']}" in row
            scores = page.eval_on_selector_all("#alternatives .score b", "els => els.map((e) => Number(e.textContent))")
            assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        finally:
            browser.close()


def test_batcher_groups_by_key_up_to_the_batch_size():
    import asyncio

    from mmcap.serve.batching import Batcher

    calls = []

    def run(key, items):
        calls.append((key, items))
        return [f"{key}{item}" for item in items]

    async def main():
        batcher = Batcher(run, max_batch_size=3, timeout=0.05)
        worker = asyncio.create_task(batcher.serve_forever())
        jobs = [("a", i) for i in range(5)] + [("b", i) for i in range(2)]
        answers = await asyncio.gather(*(batcher.submit(key, i) for key, i in jobs))
        worker.cancel()
        batcher.close()
        return answers

    answers = asyncio.run(main())
    assert [result for result, _ in answers] == ["a0", "a1", "a2", "a3", "a4", "b0", "b1"]
    assert calls == [("a", [0, 1, 2]), ("a", [3, 4]), ("b", [0, 1])]  # oldest key first, never mixed
    assert [size for _, size in answers] == [3, 3, 3, 2, 2, 2, 2]


def test_options_parse_form_text_and_json_values():
    from mmcap.generation.config import GenerationConfig
    from mmcap.serve.options import OptionError, parse_options

    defaults = GenerationConfig(num_beams=3)
    form, attention = parse_options({"max_new_tokens": "7", "do_sample": "true", "top_p": "0.5",
                                     "early_stopping": "never", "attention": "yes"}, defaults, 31)
    assert (form.num_beams, form.max_new_tokens, form.do_sample, form.top_p, form.early_stopping, attention) == \
        (3, 7, True, 0.5, "never", True)
    as_json, attention = parse_options({"num_beams": 2, "temperature": 1, "attention": None}, defaults, 31)
    assert (as_json.num_beams, as_json.temperature, attention) == (2, 1.0, False)
    for bad in ({"max_new_tokens": 32}, {"num_beams": 9}, {"num_beams": 2.0}, {"do_sample": 1},
                {"top_p": "inf"}, {"top_k": "-1"}, {"seed": 1}):
        with pytest.raises(OptionError):
            parse_options(bad, defaults, 31)
