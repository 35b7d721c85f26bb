"""Caption decoding: the options (`config`), the searches (`greedy`, `beam_search`), the logits
processors, and the decoding passes they run over (`passes`, a declared Protocol)."""
from mmcap.generation.config import GenerationConfig
from mmcap.generation.decode import generate
from mmcap.generation.output import GenerationOutput

__all__ = ["GenerationConfig", "GenerationOutput", "generate"]
