"""The characters of scripts written without spaces between words (Chinese, Japanese): each is a
word of its own (caption_io.text) and is written against its neighbours with no space
(caption_io.tokenizer). Plain Python, so modules that only spell captions need no TensorFlow."""
from __future__ import annotations

import re

# The characters that are words of their own: Han ideographs (CJK radicals, the unified blocks
# and their extensions, compatibility ideographs, 々〆〇), hiragana, katakana and the prolonged
# sound mark. One list of code point ranges, spelled for RE2 (the graph) and Python's re.
RANGES = ((0x2E80, 0x2FDF), (0x3005, 0x3007), (0x3040, 0x30FF), (0x31F0, 0x31FF), (0x3400, 0x4DBF),
          (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3134F))
RE2 = "[" + "".join(f"\\x{{{lo:X}}}-\\x{{{hi:X}}}" for lo, hi in RANGES) + "]"
PYTHON = re.compile("[" + "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in RANGES) + "]")


def is_cjk(char: str) -> bool:
    """Whether a character is one of those written without spaces (a word of its own)."""
    return bool(PYTHON.fullmatch(char))
