"""The captioner model: config, encoder, attention, decoder, loss, decoding (no training, no
data)."""
from model.captioner import Captioner
from model.config import CaptionerConfig
from model.decoder import DecoderState
from model.decoding import Decoded, beam_search, decode, greedy, sample
from model.losses import CaptionLoss, caption_loss, packed_caption_loss

__all__ = ["Captioner", "CaptionerConfig", "DecoderState", "CaptionLoss", "caption_loss",
           "packed_caption_loss", "Decoded", "decode", "greedy", "beam_search", "sample"]
