"""Does reduced precision cost caption quality? CIDEr of bf16 vs fp32 captions of a trained model.

    python benchmarks/bench_caption.py --quality runs/demo/model --data 'data/demo/test-*.tar'

Prints one JSON line; the exit status is 1 when bf16's CIDEr is not within 1% of fp32's.
"""
from __future__ import annotations

import time


def quality_check(model_dir: str, data: str, num_beams: int = 3, batch_size: int = 32) -> dict:
    from mmcap import Captioner
    from mmcap.data.pipeline import iter_samples
    from mmcap.metrics import caption_metrics

    if not data:
        raise SystemExit("--quality needs --data (test shards)")
    model = Captioner.from_pretrained(model_dir)
    examples = list(iter_samples(data, min_image_size=model.config.image_size))
    if not examples:
        raise SystemExit(f"no usable samples in {data}")
    references = {ex.key: ex.captions for ex in examples}
    images = [ex.image for ex in examples]
    result: dict = {"model": str(model_dir), "images": len(examples), "num_beams": num_beams}
    captions = {}
    for precision in ("fp32", "bf16"):
        t0 = time.perf_counter()
        captions[precision] = model.caption(images, batch_size=batch_size, precision=precision, num_beams=num_beams)
        result[f"seconds_{precision}"] = round(time.perf_counter() - t0, 2)
        predictions = {ex.key: c for ex, c in zip(examples, captions[precision])}
        result[f"cider_{precision}"] = round(caption_metrics(references, predictions, meteor=False)["CIDEr"], 4)
    same = sum(a == b for a, b in zip(captions["fp32"], captions["bf16"]))
    result["same_captions"] = round(same / len(examples), 4)
    change = (result["cider_bf16"] - result["cider_fp32"]) / max(abs(result["cider_fp32"]), 1e-12)
    result["cider_relative_change"] = round(change, 5)
    result["within_1_percent"] = abs(change) <= 0.01
    return result
