"""A page a person can open in a browser: some evaluated images, each with its
generated caption, its reference captions and where the model looked per word.

    OUT/index.html, OUT/<image_id>.jpg (the image), OUT/<image_id>-attention.png

An image that cannot be found (the data directory travelled without its source
images) still gets its captions, and its attention plot is drawn over a blank
canvas of the image's size, with a note saying where it was looked for.
"""
from __future__ import annotations

import html
import io

import numpy as np

from caption_io import fileio, geometry, images

BLANK_SIZE = (geometry.INPUT_SIZE, geometry.INPUT_SIZE)  # the encoder's input, when the image's size is unknown


def find_image(file_name: str, dirs: list[str]) -> str | None:
    if file_name.startswith("/") or fileio.is_gcs(file_name):
        return file_name if fileio.exists(file_name) else None
    for d in dirs:
        path = fileio.join(d, file_name)
        if fileio.exists(path):
            return path
    return None


def _load(path: str | None) -> np.ndarray | None:
    if path is None:
        return None
    try:
        return images.decode(fileio.read_bytes(path))
    except (images.ImageError, OSError):
        return None


def canvas_sizes(boxes: dict | None) -> dict:
    """{image_id: (width, height)} from object boxes (attention.load_instances), for the blank
    canvas of an image that cannot be found."""
    return {i: (im["width"], im["height"]) for i, im in boxes["images"].items()} if boxes else {}


def picture(item: dict, image_dirs: list[str], sizes: dict | None = None) -> tuple[np.ndarray, str | None]:
    """The pixels to draw an item's attention on, and None; or, when its image cannot be
    found or read (a data directory that travelled without its source images), a blank
    canvas of the image's size from `sizes` ({image_id: (width, height)}) and a note saying
    where it was looked for. The gallery and the trainer's TensorBoard samples draw on it."""
    path = find_image(item["file_name"], image_dirs)
    pixels = _load(path)
    if pixels is not None:
        return pixels, None
    where = path or ", ".join(image_dirs) or "no image folder known (pass --images-dir)"
    w, h = (int(round(v)) for v in (sizes or {}).get(item["image_id"], BLANK_SIZE))
    return np.full((h, w, 3), 200, np.uint8), (f"image {item['file_name']} not found or unreadable "
                                               f"(looked in: {where}); attention drawn on a blank canvas")


def _jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1100px}
.item{border-top:1px solid #ccc;padding:1em 0}.item img{max-width:100%}
.photo{max-height:260px}.gen{font-size:1.2em;font-weight:bold}.note{color:#a40}
pre{background:#f4f4f4;padding:.6em}"""


def write(out_dir: str, items: list[dict], image_dirs: list[str], sizes: dict | None = None,
          summary: str = "") -> str:
    """items: {"image_id", "file_name", "caption", "references", "words", "attention"};
    sizes: {image_id: (width, height)} for blank canvases. Returns index.html's path."""
    from caption_serving.plot import attention_png

    found = 0
    parts = []
    for item in items:
        image_id = item["image_id"]
        canvas, missing = picture(item, image_dirs, sizes)
        notes, figures = [], []
        if missing is None:
            found += 1
            fileio.write_bytes(fileio.join(out_dir, f"{image_id}.jpg"), _jpeg(canvas))
            figures.append(f'<img class="photo" src="{image_id}.jpg" alt="image {image_id}">')
        else:
            notes.append(missing)
        if item["words"]:
            png = attention_png(canvas, item["words"], item["attention"])
            fileio.write_bytes(fileio.join(out_dir, f"{image_id}-attention.png"), png)
            figures.append(f'<img src="{image_id}-attention.png" alt="attention per word, image {image_id}">')
        else:
            notes.append("empty caption: no attention to plot")
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in item["references"])
        parts.append(
            f'<div class="item"><h3>{html.escape(item["file_name"])} (id {image_id})</h3>'
            f'<p class="gen">{html.escape(item["caption"]) or "(empty)"}</p>'
            + "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
            + f"<p>References:</p><ul>{refs}</ul>" + "".join(f"<p>{f}</p>" for f in figures) + "</div>")
    header = f"<p>{len(items)} images, {found} found on disk.</p>"
    if items and not found:
        header += ('<p class="note">None of the images could be found; captions are listed all the same. '
                   "Point --images-dir at the folder holding them.</p>")
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>Caption gallery</title>"
            f"<style>{_STYLE}</style></head><body><h1>Caption gallery</h1>"
            f"<pre>{html.escape(summary)}</pre>{header}{''.join(parts)}</body></html>\n")
    index = fileio.join(out_dir, "index.html")
    fileio.write_text(index, page)
    return index
