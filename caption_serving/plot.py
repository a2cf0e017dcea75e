"""Pictures of where the model looked: one panel per generated word, the word's attention
over the encoder's grid of cells stretched over the image, the word as the panel's title."""
from __future__ import annotations

import functools
import io
import math
import os
import re
import warnings

import numpy as np

from caption_io import geometry

# Characters matplotlib's default font (DejaVu Sans) has no glyphs for and a CJK font has: CJK
# punctuation, kana, Hangul, ideographs (with extension A and the supplementary planes' ones),
# full-width forms.
CJK = re.compile("[\u1100-\u11ff\u2e80-\u9fff\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff"
                 "\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0003ffff]")
# Fonts tried first (WenQuanYi Micro Hei is what `make fonts` installs); any other font with an
# ideograph is found too, after them.
KNOWN_CJK_FAMILIES = ("WenQuanYi Micro Hei", "WenQuanYi Zen Hei", "Noto Sans CJK SC", "Noto Sans CJK JP",
                      "Source Han Sans SC", "Source Han Sans", "Droid Sans Fallback", "AR PL UMing CN")
PROBE = "中"  # in every Chinese, Japanese and Korean font
NO_CJK_FONT = ("no font with Chinese or Japanese glyphs is installed: attention plots draw those words' "
               "titles as empty boxes; install one, e.g. `apt-get install fonts-wqy-microhei` on Debian or "
               "Ubuntu (`make fonts` does it)")


@functools.cache
def cjk_family() -> str | None:
    """The family name of an installed font with CJK glyphs, registered with matplotlib; None if
    there is none. matplotlib's font list is cached on disk when it is first built, so a font
    installed since is not in it: the system's font files it lacks are looked at too, and the one
    chosen is added. Decided once a process: reading a font's character map takes milliseconds,
    and the first call may read each font on the machine (a fraction of a second)."""
    import matplotlib
    from matplotlib import font_manager, ft2font

    manager = font_manager.fontManager
    own = os.path.join(matplotlib.get_data_path(), "fonts")  # DejaVu, STIX, Computer Modern: no CJK
    rank = {name: i for i, name in enumerate(KNOWN_CJK_FAMILIES)}
    # (file, the family matplotlib knows it by; None: not in its list); a collection (.ttc) is
    # listed once a face.
    listed = sorted(((f.fname, f.name) for f in manager.ttflist if not f.fname.startswith(own)),
                    key=lambda entry: rank.get(entry[1], len(rank)))
    known = {path for path, _ in listed}
    unlisted = sorted((p, None) for p in font_manager.findSystemFonts() if p not in known and not p.startswith(own))
    read = set()
    for path, name in [*listed, *unlisted]:
        if path in read:
            continue
        read.add(path)
        try:
            font = ft2font.FT2Font(path)
            if ord(PROBE) not in font.get_charmap():
                continue
        except Exception:  # a file FreeType cannot read is no candidate
            continue
        if name is None:
            manager.addfont(path)
        return name or font_manager.ttfFontProperty(font).name
    return None


@functools.cache
def _warn_no_cjk_font() -> None:
    """NO_CJK_FONT, once a process: every plot after the first would only repeat it."""
    warnings.warn(NO_CJK_FONT, stacklevel=3)


def title_font(words: list[str]) -> dict | None:
    """set_title's font arguments for these words: matplotlib's default family, then a CJK font it
    falls back to glyph by glyph, when a word has CJK characters (Latin letters keep the default
    font's look); {} otherwise, so plots of other words are drawn as before. None when a word has
    CJK characters and no font has them (NO_CJK_FONT is warned)."""
    if not any(CJK.search(w) for w in words):
        return {}
    family = cjk_family()
    if family is None:
        _warn_no_cjk_font()
        return None
    from matplotlib import rcParams

    return {"fontfamily": [*rcParams["font.family"], family]}


def heat_map(weights: np.ndarray, grid: tuple[int, int], width: int, height: int) -> np.ndarray:
    """One word's attention row (row-major over `grid`, (rows, columns)) as a [height, width]
    map in [0, 1]: scaled to [0, 1] per word, so a vague look shows as clearly as a sharp one,
    and upsampled smoothly (bilinear) over the image, rows down and columns across."""
    from PIL import Image

    a = np.asarray(weights, np.float32).reshape(grid)
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-8)
    return np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)) / 255.0


def fit_title(ax, renderer, smallest: float = 7.0) -> None:
    """Shrinks the panel's title until it is no wider than the panel, down to `smallest` points,
    then cuts it short with an ellipsis: a long word (a phrase of a language written without
    spaces, a long word piece) would otherwise run into its neighbours' titles or off the page."""
    ax.apply_aspect()  # the image's box, as drawn
    title, width = ax.title, ax.get_window_extent(renderer).width
    wide = title.get_window_extent(renderer).width
    if wide <= width:
        return
    title.set_fontsize(max(smallest, title.get_fontsize() * width / wide))
    text = title.get_text()
    while len(text) > 1 and title.get_window_extent(renderer).width > width:
        text = text[:-1]
        title.set_text(text + "…")


def attention_png(image: np.ndarray, words: list[str], attention: np.ndarray,
                  grid: tuple[int, int] | None = None, panel_inches: float = 2.2) -> bytes:
    """image uint8 [H, W, 3]; attention [len(words), positions] (row t: the weights when word t
    was generated); grid: the encoder's (rows, columns), whose product is positions (the export's
    or data directory's geometry; None: a square grid, inferred). Returns the PNG's bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(words)
    if n == 0:
        raise ValueError("no words to plot")
    attention = np.asarray(attention, np.float32)[:n]
    grid = geometry.grid_of(attention.shape[-1], grid)
    panel_cols = min(n, max(3, math.ceil(math.sqrt(n))))
    panel_rows = math.ceil(n / panel_cols)
    h, w = image.shape[:2]
    aspect = h / w
    font = title_font(words)
    fig, axes = plt.subplots(panel_rows, panel_cols, squeeze=False,
                             figsize=(panel_cols * panel_inches, panel_rows * (panel_inches * aspect + 0.4)))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(image)
        ax.imshow(heat_map(attention[i], grid, w, h), cmap="gray", alpha=0.6, extent=(0, w, h, 0))
        ax.set_title(words[i], fontsize=11, **(font or {}))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        if font is None:  # NO_CJK_FONT said it once; matplotlib would say it again for every glyph
            warnings.filterwarnings("ignore", r"Glyph \d+ .* missing from font")
        fig.tight_layout()
        for ax in axes.flat[:n]:
            fit_title(ax, fig.canvas.get_renderer())
        fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()
