"""mmcap: image captioning with a ResNet encoder and a GPT-2/BERT decoder."""
__version__ = "0.1.0"

from .captioner import Captioner  # noqa: E402
from .config import CaptionerConfig, DecoderConfig, EncoderConfig, ProjectionConfig, TokenizerConfig  # noqa: E402

__all__ = ["Captioner", "CaptionerConfig", "EncoderConfig", "ProjectionConfig", "DecoderConfig", "TokenizerConfig", "__version__"]
