"""`mmcap serve`: load a saved model and serve it (see `mmcap.serve.app`)."""
from __future__ import annotations

import argparse

from mmcap.accel.plan import PRECISIONS

PRECISION_HELP = ("fp32 (default): captions equal Captioner.caption's, whatever the batching; bf16/auto: "
                  "faster where bf16 pays, captions may differ slightly from fp32 and with the batch")


def serve_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmcap serve", description="Serve a saved mmcap model over HTTP, with a page at /.")
    p.add_argument("--model", required=True, help="a save_pretrained directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    p.add_argument("--max-batch-size", type=int, default=16, help="most requests decoded together (default 16)")
    p.add_argument("--batch-timeout", type=float, default=0.01, metavar="SECONDS",
                   help="how long the first request of a batch waits for others (default 0.01)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest image accepted, in MiB (default 10)")
    args = p.parse_args(argv)
    if args.max_batch_size < 1 or args.batch_timeout < 0 or args.max_upload_mb <= 0:
        p.error("--max-batch-size must be >= 1, --batch-timeout >= 0 and --max-upload-mb > 0")

    import uvicorn

    from mmcap.captioner.model import Captioner
    from mmcap.serve.app import create_app

    model = Captioner.from_pretrained(args.model).to(args.device)
    app = create_app(model, args.precision, args.max_batch_size, args.batch_timeout,
                     max_upload_bytes=int(args.max_upload_mb * 2**20))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
