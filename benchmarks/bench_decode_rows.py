"""What a decoding step costs, at int8 on this CPU, for bench_caption's model (ResNet-50 @224 +
GPT-2 small's shape, beam 3, 20 tokens): the figures behind slot refill and the AMX preference.

    python benchmarks/bench_decode_rows.py        # about a minute on 2 cores

- `step_ms_by_rows`: ms per decoding step of `generate` with 16, 8 and 4 images (48, 24 and 12
  rows): the part that does not shrink with the rows is what slot refill saves per step it avoids;
- `ms_per_batch_by_engine`: a batch of 16 decoded with every int8 layer of the decoder on mmcap's AMX
  kernel (its LayerNorm, GELU and residual fused) and on oneDNN, and with only the LM head moved to
  oneDNN, alternating, best of `--rounds` (where both engines run): what the per-shape race,
  which times one weight in cache and no fused work, leaves out (`quantize.AMX_MIN_SPEEDUP`);
  `all_amx_separate_top` is every layer on AMX with the LM head writing its logits for
  `log_softmax_top` to read, in place of `int8_linear_top` (`Int8Linear.head_top`).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from measure import emit
from models import GENERATION, build_mmcap
from photos import make_photos

from mmcap.accel import quantize
from mmcap.accel.plan import as_plan
from mmcap.generation import generate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    paths = [str(x) for x in make_photos(Path(tempfile.mkdtemp(prefix="mmcap-rows-")), 16)]
    model = build_mmcap()
    model.caption(paths, batch_size=16, precision="int8", **GENERATION)  # builds, races
    plan = as_plan("int8", model.device)
    plan.prepare()
    tok, cfg = model.tokenizer, model.generation_options(**GENERATION)
    weights = {name: int8_weight(m) for name, m in model.decoder.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    result: dict = {"step_ms_by_rows": {}}
    with torch.inference_mode(), plan.computing():
        pixels, _ = model.preprocess(paths, draft=plan.draft)
        memory = plan.project(model.projection, plan.encode(model.encoder, pixels))
        with plan.decoding(model.decoder, memory) as memory:

            def decode(images: int) -> float:
                t0 = time.perf_counter()
                generate(model.decoder, memory[:images], tok.bos_id, tok.eos_id, tok.pad_id, cfg,
                         fusion=model.fusion, attention=plan.attention)
                return time.perf_counter() - t0

            for images in (16, 8, 4):
                best = min(decode(images) for _ in range(args.rounds))
                result["step_ms_by_rows"][images * cfg.num_beams] = round(1e3 * best / cfg.max_new_tokens, 2)
            twins = {name: m for name, m in model.decoder.named_modules() if isinstance(m, quantize.Int8Linear)}
            engines = [e for e in (quantize.AMX, "onednn") if e in quantize._candidate_engines()]
            kernels = {name: {e: quantize._kernel(e, *weights[name], twin.bias) for e in engines}
                       for name, twin in twins.items()}
            raced = {name: (twin.engine, twin._packed) for name, twin in twins.items()}
            layouts = {f"all_{e}": {name: e for name in twins} for e in engines}
            if len(engines) == 2:
                layouts["lm_head_onednn"] = {name: "onednn" if name == "lm_head" else quantize.AMX for name in twins}
            if quantize.AMX in engines and twins["lm_head"].head_top is not None:
                layouts["all_amx_separate_top"] = layouts[f"all_{quantize.AMX}"]
            best = {layout: float("inf") for layout in layouts}
            for _ in range(args.rounds):
                for layout, chosen in layouts.items():
                    for name, twin in twins.items():
                        twin._packed = kernels[name][chosen[name]]
                        use_engine(twin, chosen[name])
                    if layout == "all_amx_separate_top":
                        twins["lm_head"].head_top = None
                    best[layout] = min(best[layout], decode(16))
            for name, twin in twins.items():
                twin._packed = raced[name][1]
                use_engine(twin, raced[name][0])
            result["ms_per_batch_by_engine"] = {layout: round(1e3 * t, 1) for layout, t in best.items()}
    emit(result)
    return 0


def int8_weight(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight [out, in], per-channel scales) as `Int8Linear` makes them."""
    w = (layer.weight.t() if isinstance(layer, Conv1D) else layer.weight).detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    return (w / scales[:, None]).round_().clamp_(-127, 127).to(torch.int8), scales


def use_engine(twin, engine: str) -> None:
    """`twin` offers `Int8Linear.fused` and `head_top` where `engine` is the AMX kernel, as a twin made
    for it would."""
    if engine == quantize.AMX:
        twin.__dict__.pop("fused", None)
        if twin._top is not None:
            twin.__dict__.pop("head_top", None)
    else:
        twin.fused = twin.head_top = None


if __name__ == "__main__":
    sys.exit(main())
