"""A lever of the captioning-speed issue that did not pay: GPT-2's cached decoding step on ONNX
Runtime, int8, against mmcap's own int8 step in torch.

    python benchmarks/bench_ort_decoder.py            # one JSON line (about 2 minutes on 2 cores)

The decoder is bench_caption's (`models.build_mmcap`: GPT-2 small's shape, random weights). One
decoding step (embeddings, 12 blocks with self- and cross-attention, LM head; past keys/values in,
present out) is exported to ONNX (torch's TorchScript exporter) and quantized the way ONNX
Runtime documents for transformers on CPUs (`quantize_dynamic`: int8 weights per output channel,
activations quantized per call; its optimizer fuses them into `DynamicQuantizeMatMul`). Both
sides decode 16 images x 3 beams = 48 rows for 20 steps (the first on the 16 images, then each
row repeated 3x), over the same random tokens and image tokens, without beam search, so that only
the step differs: mmcap's side is `mmcap.generation.passes.GPT2Decoding` under `mmcap.accel.quantize.int8_linears`
with attention in bf16 where bf16 measured fast, as `precision="int8"` runs it. Each side is timed
alternately, best of `--rounds`. `max_logit_diff_*` compare each side's first-step logits with the
fp32 decoder's.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import torch
from torch import nn

from measure import emit, log
from models import BEAMS, NEW_TOKENS, build_mmcap

from mmcap.generation.gpt2_pass import GPT2Decoding
from mmcap.accel.precision import compute_dtype
from mmcap.accel.quantize import int8_linears

IMAGES, GRID = 16, 49


class OneStep(nn.Module):
    """GPT-2's cached step as one graph: (tokens [N], position [1], past [layers, 2, N, heads, t,
    head_dim], image keys [layers, B, heads, head_dim, M], image values [layers, B, heads, M,
    head_dim]) -> (logits [N, vocab], present [layers, 2, N, heads, t + 1, head_dim])."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, position, past, cross_keys, cross_values):
        body, n, b = self.model.transformer, tokens.shape[0], cross_keys.shape[1]
        w = self.model.config.hidden_size
        h = self.model.config.num_attention_heads
        x = body.wte(tokens) + body.wpe(position)
        present = []
        for i, block in enumerate(body.h):
            attn, cross, mlp = block.attn, block.crossattention, block.mlp
            qkv = torch.matmul(block.ln_1(x), attn.c_attn.weight) + attn.c_attn.bias
            kv = torch.cat([past[i], qkv[:, w:].reshape(n, 2, h, 1, w // h).transpose(0, 1)], dim=3)
            present.append(kv)
            s = torch.matmul(qkv[:, :w].reshape(n, h, 1, w // h) * attn.scaling, kv[0].transpose(-1, -2))
            y = torch.matmul(torch.softmax(s, -1), kv[1]).reshape(n, w)
            x = x + torch.matmul(y, attn.c_proj.weight) + attn.c_proj.bias
            q = torch.matmul(block.ln_cross_attn(x), cross.q_attn.weight) + cross.q_attn.bias
            q = q.reshape(b, n // b, h, w // h).transpose(1, 2)
            s = torch.matmul(q * cross.scaling, cross_keys[i])
            y = torch.matmul(torch.softmax(s, -1), cross_values[i]).transpose(1, 2).reshape(n, w)
            x = x + torch.matmul(y, cross.c_proj.weight) + cross.c_proj.bias
            z = torch.nn.functional.gelu(torch.matmul(block.ln_2(x), mlp.c_fc.weight) + mlp.c_fc.bias, approximate="tanh")
            x = x + torch.matmul(z, mlp.c_proj.weight) + mlp.c_proj.bias
        return torch.matmul(body.ln_f(x), self.model.lm_head.weight.t()), torch.stack(present)


def image_keys_values(model, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each layer's cross-attention keys [layers, B, heads, head_dim, M] and values [.., M, head_dim]."""
    b, m, w = memory.shape
    h = model.config.num_attention_heads
    keys, values = [], []
    for block in model.transformer.h:
        k, v = block.crossattention.c_attn(memory).split(w, dim=2)
        keys.append(k.view(b, m, h, -1).permute(0, 2, 3, 1))
        values.append(v.view(b, m, h, -1).transpose(1, 2))
    return torch.stack(keys).contiguous(), torch.stack(values).contiguous()


def ort_session(model, folder: str):
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    cfg = model.config
    layers, h, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    example = (torch.zeros(6, dtype=torch.long), torch.tensor([2]), torch.zeros(layers, 2, 6, h, 2, d),
               torch.zeros(layers, 2, h, d, GRID), torch.zeros(layers, 2, h, GRID, d))
    fp32, int8 = os.path.join(folder, "step.onnx"), os.path.join(folder, "step_int8.onnx")
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(OneStep(model), example, fp32, dynamo=False, opset_version=17,
                          input_names=["tokens", "position", "past", "cross_keys", "cross_values"],
                          output_names=["logits", "present"],
                          dynamic_axes={"tokens": {0: "n"}, "past": {2: "n", 4: "t"}, "cross_keys": {1: "b"},
                                        "cross_values": {1: "b"}, "logits": {0: "n"}, "present": {2: "n", 4: "t1"}})
        quantize_dynamic(fp32, int8, per_channel=True, weight_type=QuantType.QInt8)
    log(f"exported and quantized in {time.perf_counter() - t0:.1f} s")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(int8, options, providers=["CPUExecutionProvider"])


def run(args) -> dict:
    cap = build_mmcap()
    model = cap.decoder.eval().requires_grad_(False)
    torch.manual_seed(0)
    memory = torch.randn(IMAGES, GRID, model.config.hidden_size)
    tokens = torch.randint(0, model.config.vocab_size, (NEW_TOKENS, IMAGES * BEAMS))
    cross_keys, cross_values = image_keys_values(model, memory)
    attention_dtype = compute_dtype("auto")

    def torch_steps() -> torch.Tensor:
        with torch.no_grad(), int8_linears(model):
            dec = GPT2Decoding(model, memory, max_len=NEW_TOKENS, attention_dtype=attention_dtype)
            seqs = tokens[:1, :IMAGES].t()
            first = dec(seqs)[0]
            dec.expand(BEAMS)
            for t in range(1, NEW_TOKENS):
                dec(tokens[: t + 1].t())
        return first

    with tempfile.TemporaryDirectory(prefix="mmcap-ort-") as folder:
        session = ort_session(model, folder)

    def ort_steps() -> torch.Tensor:
        layers, h = model.config.num_hidden_layers, model.config.num_attention_heads
        past = torch.zeros(layers, 2, IMAGES, h, 0, model.config.hidden_size // h).numpy()
        keys, values = cross_keys.numpy(), cross_values.numpy()
        first = None
        for t in range(NEW_TOKENS):
            rows = tokens[t, :IMAGES] if t == 0 else tokens[t]
            logits, past = session.run(None, {"tokens": rows.numpy(), "position": torch.tensor([t]).numpy(),
                                              "past": past, "cross_keys": keys, "cross_values": values})
            if t == 0:
                first = torch.from_numpy(logits)
                past = past.repeat(BEAMS, axis=2)
        return first

    with torch.no_grad():
        reference = OneStep(model)(tokens[0, :IMAGES], torch.tensor([0]),
                                   torch.zeros(model.config.num_hidden_layers, 2, IMAGES, model.config.num_attention_heads, 0,
                                               model.config.hidden_size // model.config.num_attention_heads),
                                   cross_keys, cross_values)[0]
    best = {"torch": float("inf"), "ort": float("inf")}
    firsts = {}
    for _ in range(args.rounds):
        for name, steps in (("torch", torch_steps), ("ort", ort_steps)):
            t0 = time.perf_counter()
            firsts[name] = steps()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {
        "torch_int8_ms_per_20_steps": round(best["torch"] * 1e3, 1),
        "ort_int8_ms_per_20_steps": round(best["ort"] * 1e3, 1),
        "ort_over_torch": round(best["ort"] / best["torch"], 2),
        "max_logit_diff_torch_int8": round(float((firsts["torch"] - reference).abs().max()), 4),
        "max_logit_diff_ort_int8": round(float((firsts["ort"] - reference).abs().max()), 4),
        "max_abs_logit_fp32": round(float(reference.abs().max()), 3),
        "attention_dtype": str(attention_dtype).replace("torch.", ""),
        "rows": IMAGES * BEAMS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    emit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
