"""Decoding image files to RGB pixels, with a reason for every failure.

PIL does the decoding because it reads what users actually have (greyscale,
CMYK JPEGs, PNGs under a .jpg name, ...) and says what is wrong when it cannot.
Resizing and scaling happen in TensorFlow (the backbone's prepare, model.backbones), the same
ops the SavedModel runs, so features made here match what serving computes.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from caption_io import cli

# A decompression bomb is refused rather than decoded: 100 MP is ~8x COCO's largest.
MAX_PIXELS = 100_000_000


class ImageError(ValueError, cli.UserError):
    """An image that cannot be used; str() is the reason."""


def decode(data: bytes) -> np.ndarray:
    """Image file bytes -> uint8 [H, W, 3] RGB."""
    if not data:
        raise ImageError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"image too large ({img.width}x{img.height} pixels, the cap is {MAX_PIXELS})")
            img.load()  # decode now: truncation shows up here, not at open()
            rgb = img.convert("RGB")  # greyscale, palette, CMYK, RGBA -> RGB
            return np.asarray(rgb, dtype=np.uint8)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e)
        if "truncated" in msg.lower():
            raise ImageError(f"truncated image ({msg})") from None
        raise ImageError(f"corrupt image ({msg})") from None
