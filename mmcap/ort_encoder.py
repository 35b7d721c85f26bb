"""The encoder on ONNX Runtime, for `precision="int8"` wherever it measures faster than torch.

Where bf16 is slow, `auto` (and so int8's encoder) computes in fp32, and for fp32 convolutions ONNX
Runtime's kernels can beat torch's. On a 2-core AMD EPYC, ResNet-50 on 16 images took 0.30 s on
ONNX Runtime and 0.39 s in torch (folded, channels-last). Neither wins on every CPU, so where int8
encodes in fp32 it times both once per encoder and image size, keeps the faster, and logs the
figures; no CPU flags are read. Where `auto` measured bf16 faster, torch's bf16 runs the encoder
(0.17 s here): ONNX Runtime has no fast bf16 convolutions to race it with.

`onnxruntime` is optional (`pip install mmcap[onnx]`); without it torch runs the encoder. The graph
exported is the folded fp32 twin's (`mmcap.folding`). It is re-exported when a weight changes. The
session uses torch's thread count, and its threads do not spin after a call: spinning threads would
take the cores the decoder needs next.
"""
from __future__ import annotations

import io
import logging
import time
import warnings
import weakref
from typing import Callable, Optional

import torch
from torch import nn

from .folding import fingerprint, folded_encoder

log = logging.getLogger(__name__)

Runner = Callable[[torch.Tensor], torch.Tensor]  # normalised pixels [B, 3, H, W] -> grid [B, C, h, w]

# per encoder: {(fingerprint, dtype, image shape): (name, runner)}, and its ONNX Runtime session
_CHOICES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_SESSIONS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def fastest_encoder(encoder: nn.Module, dtype: torch.dtype, pixels: torch.Tensor) -> Runner:
    """The faster of torch's folded twin in `dtype` and, where `dtype` is fp32 and `onnxruntime`
    is installed, the twin on ONNX Runtime, timed on `pixels` the first time this encoder (as it
    is now) meets images of this shape."""
    key = (fingerprint(encoder), dtype, tuple(pixels.shape[1:]))
    choices = _CHOICES.setdefault(encoder, {})
    if key not in choices:
        candidates = {f"torch {str(dtype).replace('torch.', '')}": _torch_runner(encoder, dtype)}
        # ONNX Runtime's CPU convolutions have no fast bf16 path: a candidate only where `auto`
        # measured fp32 faster (here torch's bf16 ran 0.17 s, ONNX Runtime's fp32 0.30 s)
        ort_run = _ort_runner_if_usable(encoder, pixels) if dtype == torch.float32 else None
        if ort_run is not None:
            candidates["onnxruntime fp32"] = ort_run
        times = {name: _time(run, pixels) for name, run in candidates.items()} if len(candidates) > 1 else {}
        best = min(times, key=times.get) if times else next(iter(candidates))
        if times:
            log.info("mmcap int8 encoder: %s (%s, %d images)", best,
                     ", ".join(f"{n} {t:.3f} s" for n, t in times.items()), len(pixels))
        for stale in [k for k in choices if k[0] != key[0]]:  # made for older weights
            del choices[stale]
        choices[key] = (best, candidates[best])
        if not best.startswith("onnxruntime"):
            _SESSIONS.pop(encoder, None)  # not chosen: free its memory
    return choices[key][1]


def _ort_runner_if_usable(encoder: nn.Module, pixels: torch.Tensor) -> Optional[Runner]:
    """ONNX Runtime's runner, or None where onnxruntime is missing or cannot export or run this
    encoder (then torch runs it, and the reason is logged)."""
    if not onnxruntime_available():
        return None
    try:
        run = _ort_runner(encoder)
        run(pixels[:1])
        return run
    except Exception as e:  # noqa: BLE001 - any failure only removes a candidate
        log.warning("mmcap int8 encoder: ONNX Runtime cannot run this encoder (%s: %s); torch runs it",
                    type(e).__name__, e)
        _SESSIONS.pop(encoder, None)
        return None


def _torch_runner(encoder: nn.Module, dtype: torch.dtype) -> Runner:
    twin = folded_encoder(encoder, dtype)
    return lambda pixels: twin(pixels.to(dtype).contiguous(memory_format=torch.channels_last))


def _ort_runner(encoder: nn.Module) -> Runner:
    session = ort_session(encoder)
    name = session.get_inputs()[0].name

    def run(pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(session.run(None, {name: x})[0])

    return run


def ort_session(encoder: nn.Module):
    """An ONNX Runtime session of `encoder`'s folded fp32 twin (any batch size and image size),
    made once and remade when a weight changes."""
    import onnxruntime as ort

    key = fingerprint(encoder)
    held = _SESSIONS.get(encoder)
    if held is not None and held[0] == key:
        return held[1]
    model = export_onnx(encoder)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    _SESSIONS[encoder] = (key, session)
    return session


def export_onnx(encoder: nn.Module) -> bytes:
    """The ONNX model (bytes) of `encoder`'s folded fp32 twin: input `pixels` [B, 3, H, W] of any
    batch and size, output `grid`."""
    twin = folded_encoder(encoder, torch.float32)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), torch.autocast("cpu", enabled=False):
        warnings.simplefilter("ignore")  # the exporter's notes on tracing and its own deprecation
        torch.onnx.export(twin, (torch.zeros(1, 3, 64, 64),), buffer, dynamo=False, input_names=["pixels"],
                          output_names=["grid"], opset_version=17,
                          dynamic_axes={"pixels": {0: "batch", 2: "height", 3: "width"}, "grid": {0: "batch", 2: "h", 3: "w"}})
    return buffer.getvalue()


def _time(run: Runner, pixels: torch.Tensor, repeats: int = 2) -> float:
    """Best of `repeats` timed calls after one warm-up."""
    with torch.no_grad():
        run(pixels)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run(pixels)
            best = min(best, time.perf_counter() - start)
    return best


def choice(encoder: nn.Module) -> Optional[str]:
    """What `fastest_encoder` chose last for `encoder` ("torch bf16", "onnxruntime fp32", ...)."""
    held = _CHOICES.get(encoder)
    return list(held.values())[-1][0] if held else None
