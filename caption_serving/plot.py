"""Pictures of where the model looked: one panel per generated word, the word's attention
over the encoder's grid of cells stretched over the image, the word as the panel's title."""
from __future__ import annotations

import io
import math

import numpy as np

from caption_io import geometry


def heat_map(weights: np.ndarray, grid: tuple[int, int], width: int, height: int) -> np.ndarray:
    """One word's attention row (row-major over `grid`, (rows, columns)) as a [height, width]
    map in [0, 1]: scaled to [0, 1] per word, so a vague look shows as clearly as a sharp one,
    and upsampled smoothly (bilinear) over the image, rows down and columns across."""
    from PIL import Image

    a = np.asarray(weights, np.float32).reshape(grid)
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-8)
    return np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)) / 255.0


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
    fig, axes = plt.subplots(panel_rows, panel_cols, squeeze=False,
                             figsize=(panel_cols * panel_inches, panel_rows * (panel_inches * aspect + 0.4)))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(image)
        ax.imshow(heat_map(attention[i], grid, w, h), cmap="gray", alpha=0.6, extent=(0, w, h, 0))
        ax.set_title(words[i], fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()
