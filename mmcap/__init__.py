"""mmcap: image captioning with a torchvision ResNet encoder and a Hugging Face language-model decoder.

The package tree shows the architecture (docs/architecture.md): `config`, `images` and `metrics/`
at the bottom; `data/` and `model/` on them; `generation/` on `model/`; `accel/` (the inference plan
and its fast paths) on those; `captioner/` on all of them; the apps (`inference/`, `training/`,
`serve/`, `cli`) on top.
"""
__version__ = "0.3.0"

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from mmcap.config import CaptionerConfig, DecoderConfig, EncoderConfig, ProjectionConfig, TokenizerConfig  # noqa: E402

__all__ = ["Captioner", "CaptionerConfig", "EncoderConfig", "ProjectionConfig", "DecoderConfig", "TokenizerConfig", "__version__"]

# Module paths of 0.2 that moved in 0.3: they still import, as the new module, with a
# DeprecationWarning, until 0.5 removes them (CHANGELOG.md lists each).
MOVED = {
    "mmcap.encoder": "mmcap.model.encoder",
    "mmcap.projection": "mmcap.model.projection",
    "mmcap.decoder": "mmcap.model.decoder",
    "mmcap.tokenizer": "mmcap.model.tokenizer",
    "mmcap.lora": "mmcap.model.lora",
    "mmcap.fusion": "mmcap.model.fusion",
    "mmcap.hub": "mmcap.model.hub",
    "mmcap.generation_config": "mmcap.generation.config",
    "mmcap.decoding": "mmcap.generation.passes",
    "mmcap.gpt2_attention": "mmcap.generation.attention",
    "mmcap.attention_kernel": "mmcap.accel.kernels",
    "mmcap.precision": "mmcap.accel.precision",
    "mmcap.allocator": "mmcap.accel.allocator",
    "mmcap.folding": "mmcap.accel.folding",
    "mmcap.quantize": "mmcap.accel.quantize",
    "mmcap.int8_encoder": "mmcap.accel.int8_encoder",
    "mmcap.ort_encoder": "mmcap.accel.ort_encoder",
    "mmcap.encoder_runners": "mmcap.accel.encoder_race",
    "mmcap.call_inputs": "mmcap.captioner.inputs",
    "mmcap.streaming": "mmcap.captioner.stream",
    "mmcap.caption_cli": "mmcap.inference.cli",
    "mmcap.caption_writers": "mmcap.inference.writers",
    "mmcap.viz": "mmcap.inference.viz",
    "mmcap.features": "mmcap.training.features",
    "mmcap.scst": "mmcap.training.scst",
    "mmcap.data.cli": "mmcap.training.data_cli",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as its new module (the same object), warning once per import."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new} in mmcap 0.3; the old path goes in 0.5",
                      DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # already executed under its new name


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())


def __getattr__(name: str):
    # `Captioner` pulls in torch and transformers: import it on first use, so that commands
    # that never touch a model (`mmcap shards`, `mmcap data`) start quickly.
    if name == "Captioner":
        from mmcap.captioner import Captioner

        return Captioner
    if f"mmcap.{name}" in MOVED:  # `from mmcap import viz` and `mmcap.viz` after `import mmcap`
        return importlib.import_module(f"mmcap.{name}")
    raise AttributeError(f"module 'mmcap' has no attribute {name!r}")
