"""A page a person can open in a browser to find what is wrong with a captioner: the
evaluated images as a grid of thumbnails, each with its generated caption and its own CIDEr,
worst first; sorted and filtered in the page; a card opens the image, its references and
where the model looked per word.

    OUT/index.html            the page (its style and script inline: the folder works offline)
    OUT/<image_id>-thumb.jpg  the card's thumbnail
    OUT/<image_id>.jpg        the image
    OUT/<image_id>-attention.png

An image that cannot be found (the data directory travelled without its source images)
still gets its captions, and its attention plot is drawn over a blank canvas of the image's
size, with a note saying where it was looked for. The page's markup, style and script are
caption_eval/gallery.html; this module fills it in.
"""
from __future__ import annotations

import html
import importlib.resources
import io
import json
import math
import re

import numpy as np

from caption_io import fileio, images

# The blank canvas when the image's size is unknown too: any size shows the attention (it is
# stretched over the canvas); InceptionV3's input is as good as any.
BLANK_SIZE = (299, 299)
THUMB_SIDE = 160  # a thumbnail's longer side, in pixels
PAGE = "gallery.html"


def choose(items: list[dict], image_cider: dict, n: int) -> list[dict]:
    """The n items a gallery shows, in split order: the ceil(n/2) whose own CIDEr is lowest (what
    went wrong), then the first of the others (what the model usually says). Ties keep split order."""
    worst = sorted(range(len(items)), key=lambda k: (image_cider.get(items[k]["image_id"], float("inf")), k))
    chosen = set(worst[:(n + 1) // 2])
    chosen.update([k for k in range(len(items)) if k not in chosen][:n - len(chosen)])
    return [items[k] for k in sorted(chosen)]


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


def _jpeg(pixels: np.ndarray, longest: int | None = None) -> tuple[bytes, tuple[int, int]]:
    """JPEG bytes of the pixels, shrunk to `longest` pixels on the longer side if given, and
    the (width, height) written."""
    from PIL import Image

    image = Image.fromarray(pixels)
    if longest:
        image.thumbnail((longest, longest))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90 if longest is None else 85)
    return buf.getvalue(), image.size


# ------------------------------------------------------------------------------------ the page
def _known(value):
    """An optional per-item value as the page's data holds it: None for unknown (absent,
    None, or a CIDEr that is not a finite number), else a plain float or bool."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    value = float(value)
    return value if math.isfinite(value) else None


def _cider_text(cider: float | None) -> str:
    return "–" if cider is None else f"{cider:.3f}"


def _flag_text(value: bool | None, yes: str, no: str) -> str:
    return "unknown" if value is None else (yes if value else no)


def _card(i: int, item: dict, data: dict, thumb: tuple[int, int] | None) -> str:
    """A grid card: a button holding the thumbnail, the caption and the image's CIDEr."""
    image_id = html.escape(str(item["image_id"]))
    if thumb:
        picture_html = (f'<img class="thumb" src="{image_id}-thumb.jpg" width="{thumb[0]}" height="{thumb[1]}" '
                        f'loading="lazy" alt="">')
    else:
        picture_html = '<span class="thumb missing">image not found</span>'
    badges = []
    if data["novel"]:
        badges.append('<span class="badge novel">novel pair</span>')
    if data["right"] is False:
        badges.append('<span class="badge wrong">wrong objects</span>')
    caption = html.escape(item["caption"]) or '<span class="empty">(empty)</span>'
    return (f'<li class="card" data-i="{i}"><button type="button" aria-haspopup="dialog">{picture_html}'
            f'<span class="caption">{caption}</span>'
            f'<span class="meta">CIDEr <b class="cider">{_cider_text(data["cider"])}</b> {"".join(badges)}</span>'
            "</button></li>")


def _detail(i: int, item: dict, data: dict, notes: list[str], found: bool, plotted: bool) -> str:
    """What a card opens, in a <template> (its images load only when it is opened)."""
    image_id = html.escape(str(item["image_id"]))
    name = html.escape(item["file_name"])
    parts = [f'<h2 id="detail-title">{name} <span class="dim">(id {image_id})</span></h2>']
    if found:
        parts.append(f'<img class="photo" src="{image_id}.jpg" alt="image {image_id}">')
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    caption = html.escape(item["caption"]) or '<span class="empty">(empty)</span>'
    parts.append(f'<p class="gen">{caption}</p>')
    parts.append(f'<p class="facts">CIDEr <b>{_cider_text(data["cider"])}</b> · novel (colour, shape) pair: '
                 f'{_flag_text(data["novel"], "yes", "no")} · objects named: '
                 f'{_flag_text(data["right"], "exactly the scene", "not the scene")}</p>')
    refs = "".join(f"<li>{html.escape(r)}</li>" for r in item["references"])
    parts.append(f'<h3>References</h3><ul class="refs">{refs}</ul>')
    if plotted:
        parts.append(f'<h3>Where the model looked, per word</h3><img class="attention" '
                     f'src="{image_id}-attention.png" alt="attention per word, image {image_id}">')
    return f'<template id="detail-{i}">{"".join(parts)}</template>'


def _script_json(value) -> str:
    """JSON for inside a <script> element: no "<", ">" or "&" left, so no value can close it."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _fill(template: str, parts: dict[str, str]) -> str:
    """@@NAME@@ markers replaced in one pass (a filled-in value is never searched again)."""
    return re.sub(r"@@([A-Z]+)@@", lambda m: parts[m.group(1)], template)


def write(out_dir: str, items: list[dict], image_dirs: list[str], grid: tuple[int, int],
          sizes: dict | None = None, summary: str = "") -> str:
    """items: {"image_id", "file_name", "caption", "references", "words", "attention"} and,
    optionally, "cider" (the image's own CIDEr), "novel_pair" (the scene holds a (colour,
    shape) pair unseen in training), "objects_right" (the caption names exactly the scene's
    objects), each None when unknown; grid: the encoder's (rows, columns), the shape of an
    attention row; sizes: {image_id: (width, height)} for blank canvases. Returns index.html's path."""
    from caption_serving.plot import attention_png

    found = 0
    cards, details, data = [], [], []
    for i, item in enumerate(items):
        image_id = item["image_id"]
        row = {"i": i, "cider": _known(item.get("cider")), "novel": _known(item.get("novel_pair")),
               "right": _known(item.get("objects_right")), "caption": item["caption"]}
        canvas, missing = picture(item, image_dirs, sizes)
        notes, thumb = [], None
        if missing is None:
            found += 1
            fileio.write_bytes(fileio.join(out_dir, f"{image_id}.jpg"), _jpeg(canvas)[0])
            small, thumb = _jpeg(canvas, THUMB_SIDE)
            fileio.write_bytes(fileio.join(out_dir, f"{image_id}-thumb.jpg"), small)
        else:
            notes.append(missing)
        if item["words"]:
            png = attention_png(canvas, item["words"], item["attention"], grid)
            fileio.write_bytes(fileio.join(out_dir, f"{image_id}-attention.png"), png)
        else:
            notes.append("empty caption: no attention to plot")
        data.append(row)
        cards.append(_card(i, item, row, thumb))
        details.append(_detail(i, item, row, notes, missing is None, bool(item["words"])))
    header = f"<p>{len(items)} images, {found} found on disk.</p>"
    if items and not found:
        header += ('<p class="note">None of the images could be found; captions are listed all the same. '
                   "Point --images-dir at the folder holding them.</p>")
    template = (importlib.resources.files("caption_eval") / PAGE).read_text("utf-8")
    page = _fill(template, {"SUMMARY": html.escape(summary), "HEADER": header, "CARDS": "".join(cards),
                            "DETAILS": "".join(details), "DATA": _script_json(data)})
    index = fileio.join(out_dir, "index.html")
    fileio.write_text(index, page)
    return index
