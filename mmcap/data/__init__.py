"""Data: writing shards (`shards`, `sources`), reading them (`shardlist`, `pipeline`), the Lightning
`CaptionDataModule` (`datamodule`) and the synthetic demo set (`demo`)."""
from mmcap.data.samples import Example, Skip, decode_sample, try_decode
from mmcap.data.streams import iter_captions, iter_samples
from mmcap.data.shardlist import count_samples, resolve_shards
from mmcap.data.shards import Sample, WriteSummary, write_shards
from mmcap.data.sources import coco_samples, folder_samples, karpathy_samples, table_samples

__all__ = [
    "CaptionDataModule",
    "Example",
    "Sample",
    "Skip",
    "WriteSummary",
    "coco_samples",
    "count_samples",
    "decode_sample",
    "folder_samples",
    "iter_captions",
    "iter_samples",
    "karpathy_samples",
    "make_demo",
    "resolve_shards",
    "table_samples",
    "try_decode",
    "write_shards",
]


def __getattr__(name: str):
    # Lightning and the demo drawing code load only when asked for: `mmcap shards` stays quick.
    if name == "CaptionDataModule":
        from mmcap.data.datamodule import CaptionDataModule

        return CaptionDataModule
    if name == "make_demo":
        from mmcap.data.demo import make_demo

        return make_demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
