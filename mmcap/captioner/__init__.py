"""`Captioner`: the model with its preprocessing, decoding and save/load, and captioning streams."""
from mmcap.captioner.model import Captioner, saved_decoder_config
from mmcap.captioner.results import CaptionResult, Captions

__all__ = ["Captioner", "CaptionResult", "Captions", "saved_decoder_config"]
