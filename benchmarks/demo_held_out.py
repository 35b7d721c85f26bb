"""Exact-match rate of a demo model on test images with and without a held-out shape/colour
combination (one the training split never shows). Prints one JSON line.

    python benchmarks/demo_held_out.py [--model runs/demo/model] [--data 'data/demo/test-*.tar']
"""
from __future__ import annotations

import argparse

from common import emit, held_out_keys

from mmcap import Captioner
from mmcap.data.streams import iter_samples
from mmcap.metrics import exact_match_rate


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="runs/demo/model")
    p.add_argument("--data", default="data/demo/test-*.tar")
    args = p.parse_args(argv)
    model = Captioner.from_pretrained(args.model)
    examples = list(iter_samples(args.data))
    captions = model.caption([ex.image for ex in examples], batch_size=50, num_beams=1)
    held = held_out_keys(args.data)
    result = {"model": args.model, "data": args.data}
    for name, wanted in (("held_out", True), ("seen", False)):
        chosen = [(ex, c) for ex, c in zip(examples, captions) if (ex.key in held) == wanted]
        result[f"{name}_images"] = len(chosen)
        result[f"{name}_exact_match"] = round(exact_match_rate({ex.key: ex.captions for ex, _ in chosen},
                                                               {ex.key: c for ex, c in chosen}), 4)
    emit(result)


if __name__ == "__main__":
    main()
