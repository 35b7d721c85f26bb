"""mmcap: image captioning with a ResNet encoder and a GPT-2/BERT decoder."""
__version__ = "0.2.0"

from .config import CaptionerConfig, DecoderConfig, EncoderConfig, ProjectionConfig, TokenizerConfig  # noqa: E402

__all__ = ["Captioner", "CaptionerConfig", "EncoderConfig", "ProjectionConfig", "DecoderConfig", "TokenizerConfig", "__version__"]


def __getattr__(name: str):
    # `Captioner` pulls in torch and transformers: import it on first use, so that commands
    # that never touch a model (`mmcap shards`, `mmcap data`) start quickly.
    if name == "Captioner":
        from .captioner import Captioner

        return Captioner
    raise AttributeError(f"module 'mmcap' has no attribute {name!r}")
