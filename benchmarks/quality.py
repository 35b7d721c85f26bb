"""Caption quality of a trained model against its data set's oracle. Prints one JSON line.

The oracle is what a perfect describer scores under the same metric: each test image's first
reference, scored (CIDEr-D) against its other references. A model is scored with all references,
decoded as `Captioner.caption` does (beam 3 by default); held-out and seen images separately.

    python benchmarks/quality.py --model runs/glyphs/model --data 'data/glyphs/test-*.tar'
"""
from __future__ import annotations

import argparse
import time

from measure import emit
from photos import held_out_keys

from mmcap import Captioner
from mmcap.data.streams import iter_samples
from mmcap.metrics import caption_metrics, exact_match_rate


def oracle_cider(references: dict[str, list[str]]) -> float:
    """CIDEr-D of each image's first reference against its other references."""
    usable = {k: refs for k, refs in references.items() if len(refs) >= 2}
    return caption_metrics({k: refs[1:] for k, refs in usable.items()}, {k: refs[0] for k, refs in usable.items()},
                           meteor=False)["CIDEr"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="test shards")
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--precision", default="fp32")
    args = p.parse_args(argv)
    model = Captioner.from_pretrained(args.model)
    examples = list(iter_samples(args.data))
    references = {ex.key: ex.captions for ex in examples}
    started = time.perf_counter()
    captions = model.caption([ex.image for ex in examples], batch_size=50, num_beams=args.num_beams,
                             precision=args.precision)
    seconds = time.perf_counter() - started
    predictions = {ex.key: c for ex, c in zip(examples, captions)}
    metrics = caption_metrics(references, predictions, meteor=False)
    oracle = oracle_cider(references)
    held = held_out_keys(args.data)
    result = {"model": args.model, "data": args.data, "images": len(examples), "num_beams": args.num_beams,
              "CIDEr": round(metrics["CIDEr"], 4), "oracle_CIDEr": round(oracle, 4),
              "share_of_oracle": round(metrics["CIDEr"] / oracle, 4), "BLEU-4": round(metrics["BLEU-4"], 4),
              "exact_match": round(exact_match_rate(references, predictions), 4),
              "captions_per_s": round(len(examples) / seconds, 2)}
    for name, wanted in (("held_out", True), ("seen", False)):
        keys = [k for k in references if (k in held) == wanted]
        if keys:
            refs, preds = {k: references[k] for k in keys}, {k: predictions[k] for k in keys}
            result[f"{name}_images"] = len(keys)
            result[f"{name}_CIDEr"] = round(caption_metrics(refs, preds, meteor=False)["CIDEr"], 4)
            result[f"{name}_exact_match"] = round(exact_match_rate(refs, preds), 4)
    emit(result)


if __name__ == "__main__":
    main()
