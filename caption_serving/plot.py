"""Pictures of where the model looked: one panel per generated word, the 8x8
attention map stretched over the image, the word as the panel's title."""
from __future__ import annotations

import io
import math

import numpy as np

from caption_io import geometry


def attention_png(image: np.ndarray, words: list[str], attention: np.ndarray, grid: int = geometry.GRID,
                  panel_inches: float = 2.2) -> bytes:
    """image uint8 [H, W, 3]; attention [len(words), grid*grid] (row t: the
    weights when word t was generated). Returns the PNG's bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n = len(words)
    if n == 0:
        raise ValueError("no words to plot")
    attention = np.asarray(attention, np.float32)[:n].reshape(n, grid, grid)
    cols = min(n, max(3, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    h, w = image.shape[:2]
    aspect = h / w
    fig, axes = plt.subplots(rows, cols, figsize=(cols * panel_inches, rows * panel_inches * aspect + 0.4 * rows),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        # Smooth upsampling of the 8x8 map to the image's size, scaled to [0, 1] per word.
        a = attention[i]
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-8)
        heat = np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)) / 255.0
        ax.imshow(image)
        ax.imshow(heat, cmap="gray", alpha=0.6, extent=(0, w, h, 0))
        ax.set_title(words[i], fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()
