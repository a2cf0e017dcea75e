"""The captioner model: config, encoder, attention, decoders, loss, decoding (no training, no
data)."""
from model.captioner import Captioner
from model.config import CaptionerConfig
from model.decoding import Decoded, beam_search, decode, greedy, sample
from model.gru_decoder import GRUState
from model.losses import CaptionLoss, caption_loss, packed_caption_loss

__all__ = ["Captioner", "CaptionerConfig", "GRUState", "CaptionLoss", "caption_loss",
           "packed_caption_loss", "Decoded", "decode", "greedy", "beam_search", "sample"]
