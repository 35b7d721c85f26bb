"""Precomputed encoder features: run a frozen encoder over a dataset once, then train the
projection and decoder from the stored grids instead of from images.

With the encoder frozen, every epoch would otherwise decode each JPEG and run the ResNet again
for the same answer. A features directory holds:

    features.json          the encoder config, image size, dtype and grid shape (`FeatureSetInfo`)
    encoder.safetensors    the encoder's weights, so that the trained model captions images
    SPLIT-000000.tar ...   webdataset shards: KEY.feat.npy (grid [C, h, w]) + KEY.json (captions)
    shards.json            sample counts per shard, as `mmcap shards` writes

Features come from the evaluation transform (resize + centre crop), one view per image: training
from them equals training with the encoder frozen and without augmentation (`data.augment false`).
Arrays are stored as plain `.npy` and read with `allow_pickle=False`, so a shard never runs code.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from mmcap.config import EncoderConfig
from mmcap.data.samples import features_to_bytes
from mmcap.data.shards import FEATURE_MEMBER
from mmcap.model.encoder import ResNetEncoder
from mmcap.images import eval_transform

INFO_FILE, ENCODER_FILE = "features.json", "encoder.safetensors"
INFO_FORMAT = "mmcap-features/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class FeatureSetInfo:
    """What produced a features directory; training checks its model against it."""

    encoder: EncoderConfig
    image_size: int
    dtype: str = "float32"
    channels: int = 0
    grid: tuple[int, int] = (0, 0)
    format: str = INFO_FORMAT

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSetInfo":
        d = dict(d)
        if d.get("format") != INFO_FORMAT:
            raise ValueError(f"not an mmcap features description (format {d.get('format')!r}, want {INFO_FORMAT!r})")
        d["encoder"] = EncoderConfig(**d["encoder"])
        d["grid"] = tuple(d["grid"])
        return cls(**d)


# ---- one array <-> bytes ----


# ---- the directory ----


def load_info(directory: str | os.PathLike) -> FeatureSetInfo:
    path = Path(directory) / INFO_FILE
    try:
        return FeatureSetInfo.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: not a features directory (made by `mmcap features`)") from None
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path} is not a valid features description: {e}") from None


def load_encoder(directory: str | os.PathLike) -> tuple[ResNetEncoder, FeatureSetInfo]:
    """The frozen encoder that made a features directory (weights read from safetensors only)."""
    from safetensors.torch import load_model

    info = load_info(directory)
    encoder = ResNetEncoder(dataclasses.replace(info.encoder, weights=None), load_weights=False,
                            image_size=info.image_size)
    path = Path(directory) / ENCODER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the features directory is incomplete")
    try:
        load_model(encoder, str(path), strict=True)
    except Exception as e:
        raise ValueError(f"{path} is corrupt or does not fit {info.encoder.arch}: {e}") from None
    encoder.set_freeze("all")
    return encoder.eval(), info


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_description(encoder: ResNetEncoder, info: FeatureSetInfo, directory: str | os.PathLike) -> None:
    """Write (or check against) the directory's encoder and `features.json`.

    Every split of one directory must come from the same encoder: a second split made with other
    weights or settings is refused rather than silently mixed.
    """
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / INFO_FILE).exists():
        old_encoder, old = load_encoder(directory)
        same = old.to_dict() == info.to_dict() and all(
            torch.equal(a, b) for a, b in zip(old_encoder.state_dict().values(), encoder.state_dict().values()))
        if not same:
            raise ValueError(f"{directory} already holds features of another encoder or settings "
                             f"({old.to_dict()}); use a new --out directory")
        return
    _write_atomically(directory / ENCODER_FILE, lambda tmp: save_model(encoder, str(tmp)))
    _write_atomically(directory / INFO_FILE, lambda tmp: tmp.write_text(json.dumps(info.to_dict(), indent=2)))


# ---- extraction ----


@torch.no_grad()
def extract_features(
    encoder: ResNetEncoder,
    shards,
    out_dir: str | os.PathLike,
    *,
    split: str = "train",
    image_size: int = 224,
    batch_size: int = 64,
    dtype: str = "float32",
    maxcount: int = 1000,
    device: str = "cpu",
    precision: str = "fp32",
    progress: bool = True,
):
    """Encode every usable sample of `shards` into `out_dir/SPLIT-%06d.tar`; returns a
    `WriteSummary` (samples, shards, skipped by reason).

    The encoder runs in eval mode, in fp32 or, with `precision="bf16"`, under bf16 autocast (as
    bf16-mixed training runs it; much faster on GPUs and bf16 CPUs). `dtype` only sets how the
    grids are stored (float16/bfloat16 halve the disk and read cost and round each value once).
    """
    from mmcap.accel.plan import as_plan
    from mmcap.data.shards import write_member_shards
    from mmcap.data.streams import iter_samples

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    encoder = encoder.cpu().eval()
    probe = encoder(torch.zeros(1, 3, image_size, image_size))
    # the stride as resolved ("auto" depends on the image size): the description is exact
    info = FeatureSetInfo(encoder=dataclasses.replace(encoder.cfg, output_stride=encoder.stride, last_stage=encoder.last_stage),
                          image_size=image_size, dtype=dtype,
                          channels=int(probe.shape[1]), grid=(int(probe.shape[2]), int(probe.shape[3])))
    save_description(encoder, info, out_dir)
    plan = as_plan(precision, device)
    # channels-last is the fast layout for reduced-precision convolutions
    layout = torch.channels_last if plan.dtype != torch.float32 else torch.contiguous_format
    encoder = encoder.to(device, memory_format=layout)
    skipped: Counter = Counter()
    samples = iter_samples(shards, skipped=skipped, min_image_size=image_size)
    with plan.computing():
        summary = write_member_shards(
            _encoded(encoder, samples, eval_transform(image_size), batch_size, DTYPES[dtype], device, layout),
            str(Path(out_dir) / f"{split}-%06d.tar"), maxcount=maxcount, progress=progress,
        )
    summary.skipped.update(skipped)
    return summary


def _encoded(encoder: ResNetEncoder, examples: Iterable, transform, batch_size: int, dtype: torch.dtype,
             device: str, layout: torch.memory_format) -> Iterator[tuple[str, dict]]:
    """(key, shard members) per example, encoding `batch_size` images per forward pass."""
    batch: list = []

    def flush():
        pixels = torch.stack([transform(ex.image) for ex in batch]).to(device, memory_format=layout)
        grids = encoder(pixels).to("cpu", dtype)
        for ex, grid in zip(batch, grids):
            meta = json.dumps({"captions": ex.captions}, ensure_ascii=False).encode()
            yield ex.key, {FEATURE_MEMBER: features_to_bytes(grid), "json": meta}
        batch.clear()

    for example in examples:
        batch.append(example)
        if len(batch) == batch_size:
            yield from flush()
    if batch:
        yield from flush()


def encoder_for_features(model_dir: Optional[str] = None, config: Optional[str] = None,
                         load_weights: bool = True, image_size: Optional[int] = None) -> tuple[ResNetEncoder, int]:
    """The encoder to extract with, and its image size: a trained model's (`model_dir`) or the one
    a model/recipe YAML describes (`config`, e.g. ImageNet weights for a frozen-encoder recipe).
    `image_size` overrides the config's (an `output_stride: auto` is resolved at that size)."""
    if (model_dir is None) == (config is None):
        raise ValueError("give exactly one of a model directory or a config")
    if model_dir is not None:
        from mmcap.captioner.model import Captioner

        model = Captioner.from_pretrained(model_dir)
        return model.encoder, model.config.image_size
    from mmcap.config import CaptionerConfig, read_config_file

    is_recipe = "model" in (read_config_file(config) or {})
    cfg = CaptionerConfig.from_recipe(config) if is_recipe else CaptionerConfig.load(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # an encoder without weights is the same random one for every split
        size = image_size or cfg.image_size
        return ResNetEncoder(cfg.encoder, load_weights=load_weights, image_size=size), size


def use_feature_encoder(captioner, features_dir: str) -> None:
    """Give `captioner` the frozen encoder (weights, config, image size) that made `features_dir`,
    so that the model trained from those features captions images as it was trained."""
    import logging

    encoder, info = load_encoder(features_dir)
    if encoder.cfg.arch != captioner.config.encoder.arch:
        raise ValueError(f"{features_dir} holds {info.encoder.arch} features but model.captioner.encoder.arch is "
                         f"{captioner.config.encoder.arch}: set model.captioner.encoder.arch: {info.encoder.arch}")
    if encoder.stride != captioner.encoder.stride:
        raise ValueError(f"{features_dir} holds stride-{encoder.stride} grids but the model's encoder has output "
                         f"stride {captioner.encoder.stride}: set model.captioner.encoder.output_stride: {encoder.stride}")
    captioner.encoder.load_state_dict(encoder.state_dict())
    captioner.config = dataclasses.replace(captioner.config, encoder=dataclasses.replace(info.encoder, freeze="all"))
    captioner.encoder.set_freeze("all")
    if captioner.config.image_size != info.image_size:
        logging.getLogger(__name__).warning(
            "features were made at %d px: the model's image_size %d is set to %d",
            info.image_size, captioner.config.image_size, info.image_size)
        captioner.config = dataclasses.replace(captioner.config, image_size=info.image_size)
