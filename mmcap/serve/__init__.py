"""`mmcap serve`: captions over HTTP, with a page at `/` to try them.

FastAPI + uvicorn (chosen over LitServe by measurement, see the README). `app.py` holds the
routes and the handling of bad input, `batching.py` gathers concurrent requests into model
batches, `options.py` turns request fields into generation options, `cli.py` is the command.
Like the rest of inference, nothing here imports Lightning or training code.
"""
