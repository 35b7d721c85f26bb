"""The HTTP app: `POST /caption`, `GET /health`, the page at `/`, the OpenAPI schema at
`/openapi.json`.

Bad input never reaches the model: the body is read up to the upload limit (413 beyond it,
without reading the rest), the image is opened by `mmcap.images.open_image` (4xx naming the
reason), the options are parsed and bounded (`options.py`, 422). URLs are never fetched.
A request may carry a `prompt` (text the caption continues, as `Captioner.caption(prompt=...)`);
requests with different prompts still share a batch.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
from pathlib import Path
from typing import Union, Optional

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmcap import __version__
from mmcap.captioner.model import Captioner, CaptionResult
from mmcap.images import MAX_IMAGE_PIXELS, ImageError, eval_transform, open_image
from mmcap.accel.plan import InferencePlan, as_plan
from mmcap.serve.batching import Batcher
from mmcap.serve.options import ATTENTION, OPTIONS, OptionError, options_schema, parse_options

STATIC = Path(__file__).parent / "static"
PROMPT = "prompt"
MAX_PROMPT_CHARS = 500
# multipart boundaries and form fields around the image; base64 makes 4 bytes of every 3
FORM_OVERHEAD = 64 * 1024
IMAGE_ERROR_STATUS = {"empty_file": 400, "unreadable_image": 415, "too_large": 413}


class RequestError(Exception):
    def __init__(self, status: int, error: str, detail: str = ""):
        self.status, self.error, self.detail = status, error, detail


class Alternative(BaseModel):
    caption: str
    log_prob: float
    tokens: Optional[int] = None  # generated tokens, EOS included
    score: Optional[float] = None  # what ranks the alternatives: log_prob / tokens ** length_penalty


class CaptionResponse(BaseModel):
    caption: str
    log_prob: float
    alternatives: Optional[list[Alternative]] = None  # beam search: every finished caption, best first
    length_penalty: Optional[float] = None  # beam search: the exponent of the alternatives' scores
    words: Optional[list[str]] = None  # with attention: one per generated token, "" for the end
    attention: Optional[list[list[list[float]]]] = None  # with attention: a (H, W) grid per word


def create_app(model: Captioner, precision: Union[str, InferencePlan] = "fp32", max_batch_size: int = 16, batch_timeout: float = 0.01,
               max_upload_bytes: int = 10 * 2**20) -> FastAPI:
    """An app serving `model`; `precision` as in `Captioner.caption`, resolved once for every request."""
    model.eval()
    plan = as_plan(precision, model.device)
    draft = plan.draft  # as `caption` decodes at that precision
    size = model.config.image_size
    transform = eval_transform(size)
    max_new_tokens = model.decoder.config.max_position_embeddings - 1

    def run(key, items: list[tuple[torch.Tensor, Optional[str]]]) -> list[CaptionResult]:
        options, attention, _ = key
        pixels, prompts = zip(*items)
        return model.caption_details(torch.stack(pixels), batch_size=len(pixels), return_attention=attention,
                                     precision=plan, prompt=list(prompts), **dict(options))

    batcher = Batcher(run, max_batch_size, batch_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.serve_forever())
        yield
        task.cancel()
        batcher.close()

    # /docs and /redoc would load their scripts from a CDN: only the schema is served
    app = FastAPI(title="mmcap", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        return JSONResponse({"error": e.error, "detail": e.detail}, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):  # a bug, never bad input: logged by uvicorn
        return JSONResponse({"error": "internal_error", "detail": type(e).__name__}, status_code=500)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/caption", response_model=CaptionResponse, response_model_exclude_none=True,
              openapi_extra={"requestBody": _request_body(max_upload_bytes)})
    async def caption(request: Request):
        """Caption one image (multipart field `image`, or JSON with a base64 `image`)."""
        image, raw = await _read_request(request, max_upload_bytes)
        prompt = raw.pop(PROMPT, None)
        try:
            options, attention = parse_options(raw, model.generation_config, max_new_tokens)
        except OptionError as e:
            raise RequestError(422, "invalid_option", str(e)) from None
        options = options.resolved(model.config.max_caption_tokens)
        prompt = _checked_prompt(prompt, model, max_new_tokens + 1 - options.max_new_tokens)
        pixels = await run_in_threadpool(_pixels, image, transform, size if draft else None)
        # sampled captions depend on the random draws of their batch: each request runs alone
        key = (tuple(options.to_dict().items()), attention, object() if options.do_sample else None)
        result, batch_size = await batcher.submit(key, (pixels, prompt))
        return JSONResponse(_response(result, attention, options),
                            headers={"X-Batch-Size": str(batch_size)})

    return app


async def _read_request(request: Request, limit: int) -> tuple[bytes, dict]:
    """The image bytes and the raw options of a multipart or JSON request."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        body = await _read_body(request, limit + FORM_OVERHEAD)
        form = await _replayed(request, body).form(max_files=1, max_fields=len(OPTIONS) + 2)
        try:
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise RequestError(422, "missing_image", "send the image as the file field `image`")
            image = await upload.read()
            raw = {k: v for k, v in form.items() if k != "image"}
        finally:
            await form.close()
    elif kind == "application/json":
        body = await _read_body(request, limit * 4 // 3 + FORM_OVERHEAD)
        try:
            data = json.loads(body)
        except ValueError as e:
            raise RequestError(400, "invalid_json", str(e)) from None
        if not isinstance(data, dict) or not isinstance(data.get("image"), str):
            raise RequestError(422, "missing_image", "send {\"image\": BASE64, ...options}")
        image = _from_base64(data.pop("image"))
        raw = data
    else:
        raise RequestError(415, "unsupported_media_type", "send multipart/form-data or application/json")
    if len(image) > limit:
        raise RequestError(413, "upload_too_large", f"the image is over {limit} bytes")
    return image, raw


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit`: by its Content-Length
    before reading, else while streaming, so a huge upload is never held whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "upload_too_large", f"the request is over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "upload_too_large", f"the request is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _replayed(request: Request, body: bytes) -> Request:
    """A request whose body is `body` (already read, bounded): Starlette parses its form."""
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


def _from_base64(text: str) -> bytes:
    if text.startswith(("http://", "https://", "ftp://", "file:")):
        raise RequestError(422, "url_not_fetched", "the service never fetches URLs: send the image's bytes")
    if text.startswith("data:") and "," in text:  # a data URL, as browsers write them
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(422, "invalid_base64", str(e)) from None


def _checked_prompt(prompt, model: Captioner, room: int) -> Optional[str]:
    """The request's prompt if it is text whose tokens fit the `room` positions (BOS included) that
    the caption's max_new_tokens leave in the decoder; None for none or blank text."""
    if prompt is None:
        return None
    if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(422, "invalid_option", f"{PROMPT}: expected text of at most {MAX_PROMPT_CHARS} characters")
    tokens = len(model.tokenizer.prompt_ids(prompt))
    if 1 + tokens > room:
        raise RequestError(422, "invalid_option", f"{PROMPT}: {tokens} tokens, and the decoder has room for "
                                                  f"{max(room - 1, 0)} beside max_new_tokens")
    return prompt or None


def _pixels(image: bytes, transform, min_size: Optional[int]) -> torch.Tensor:
    try:
        return transform(open_image(image, "image", min_size=min_size))
    except ImageError as e:
        raise RequestError(IMAGE_ERROR_STATUS.get(e.reason, 400), e.reason, e.detail) from None


def _response(result: CaptionResult, attention: bool, options) -> dict:
    """The JSON of one result; `options`: the request's resolved `GenerationConfig`."""
    out = {"caption": result.caption, "log_prob": result.log_prob}
    if options.num_beams > 1:
        # ranked as beam search ranks them (transformers' convention): the raw log-prob favours
        # short captions, so each alternative also carries its tokens and its ranking score
        penalty = options.length_penalty
        tokens = result.alternative_tokens or [None] * len(result.alternatives)
        out["alternatives"] = [{"caption": c, "log_prob": lp, **({"tokens": n, "score": lp / n**penalty} if n else {})}
                               for (c, lp), n in zip(result.alternatives, tokens)]
        out["length_penalty"] = penalty
    if attention:
        out["words"] = result.words
        out["attention"] = [[[round(v, 5) for v in row] for row in grid] for grid in result.attention.tolist()]
    return out


def _request_body(limit: int) -> dict:
    """OpenAPI: the two request forms, with the options derived from `GenerationConfig`."""
    props = {**options_schema(), PROMPT: {"type": "string", "maxLength": MAX_PROMPT_CHARS,
                                          "description": "text the caption continues (left out of the caption)"}}
    form = {"type": "object", "required": ["image"],
            "properties": {"image": {"type": "string", "format": "binary"}, **props}}
    as_json = {"type": "object", "required": ["image"],
               "properties": {"image": {"type": "string", "contentEncoding": "base64"}, **props}}
    note = (f"One image of at most {limit} bytes (413 beyond) and {MAX_IMAGE_PIXELS} pixels: JPEG, PNG, "
            f"WebP, BMP, GIF or TIFF. `{ATTENTION}` adds the words and their attention grids.")
    return {"required": True, "description": note,
            "content": {"multipart/form-data": {"schema": form}, "application/json": {"schema": as_json}}}
