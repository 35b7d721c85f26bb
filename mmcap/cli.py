"""`mmcap` command: dispatches to the subcommands, each living beside the code it drives
(inference commands in `caption_cli`, training in `training.cli`, data in `data.cli`), imported
only when called: `mmcap caption` never loads Lightning."""
from __future__ import annotations

import sys

USAGE = """usage: mmcap COMMAND [options]

commands:
  caption    caption images with a saved model
  serve      an HTTP captioning service with a page to try it (`mmcap serve --model DIR`)
  fit, validate, test, predict
             Lightning training/evaluation driven by YAML configs (LightningCLI)
  eval       caption metrics of a saved model on shards
  export     write a save_pretrained directory from a Lightning checkpoint
  shards     write webdataset shards from COCO, CSV/JSONL or a folder
  features   precompute a frozen encoder's grid features into shards (train the decoder fast)
  data       make datasets (`mmcap data demo --out data/demo`)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in ("caption", "eval"):
        from mmcap.inference import cli

        return getattr(cli, f"{cmd}_main")(rest)
    if cmd == "serve":
        from mmcap.serve.cli import serve_main

        return serve_main(rest)
    if cmd in ("fit", "validate", "test", "predict"):
        from mmcap.training.cli import lightning_main

        return lightning_main([cmd, *rest])
    if cmd == "export":
        from mmcap.training.cli import export_main

        return export_main(rest)
    if cmd == "shards":
        from mmcap.training.data_cli import shards_main

        return shards_main(rest)
    if cmd == "features":
        from mmcap.training.data_cli import features_main

        return features_main(rest)
    if cmd == "data":
        from mmcap.training.data_cli import data_main

        return data_main(rest)
    print(f"mmcap: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
