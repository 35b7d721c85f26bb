"""The encoder on ONNX Runtime: one of the runners `mmcap.accel.encoder_race` races for int8 mode.

Where bf16 is slow, `auto` (and so int8's float encoder) computes in fp32, and for fp32
convolutions ONNX Runtime's kernels can beat torch's (docs/performance.md).

`onnxruntime` is optional (`pip install mmcap[onnx]`). The graph exported is the folded fp32
twin's (`mmcap.accel.folding`); it is re-exported when a weight changes. The session uses torch's thread
count, and its threads do not spin after a call: spinning threads would take the cores the decoder
needs next.
"""
from __future__ import annotations

import io
import warnings
from typing import Callable

import torch
from torch import nn

from mmcap.accel import twins
from mmcap.accel.folding import folded_encoder

Runner = Callable[[torch.Tensor], torch.Tensor]  # normalised pixels [B, 3, H, W] -> grid [B, C, h, w]


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def ort_runner(encoder: nn.Module) -> Runner:
    """`encoder` on its ONNX Runtime session: fp32 pixels in, the fp32 grid out."""
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

    def make():
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(export_onnx(encoder), options, providers=["CPUExecutionProvider"])

    return twins.twin(encoder, "onnxruntime", make)


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


def release(encoder: nn.Module) -> None:
    """Free `encoder`'s session (where it was not chosen, or its weights are gone)."""
    twins.drop(encoder, "onnxruntime")
