"""Old home of the sample functions and streams (mmcap 0.1), kept so that imports keep working:
see `samples.py` (one sample) and `streams.py` (the chains DataLoaders iterate)."""
from .samples import *  # noqa: F401,F403
from .samples import (LOGGED_SKIPS, MAX_CAPTION_CHARS, MAX_IMAGE_BYTES, Collate, Example, ShardErrors, Skip,  # noqa: F401
                      SkipCounter, decode_items, decode_sample, features_from_bytes, features_to_bytes,
                      one_torch_thread, read_captions, read_shards, shard_error_reason, to_item, truncate, try_decode)
from .streams import (EvalStream, TrainStream, batches_per_reader, eval_chunks, iter_captions,  # noqa: F401
                      iter_references, iter_samples, split_shards)
