"""A synthetic "scene set" in MS-COCO 2014 format: the offline stand-in for COCO.

The build machines cannot download COCO, so the pipelines, the download code
and the trainer are exercised on pictures of one to three flat shapes whose
colour, shape, size and place are known, each with five differently worded
captions, written exactly where and how COCO 2014 keeps its files:

    DIR/annotations/captions_{train,val}2014.json    (images + 5 captions each)
    DIR/annotations/instances_{train,val}2014.json   (one box per shape, + colour, size)
    DIR/{train,val}2014/COCO_{split}2014_%012d.jpg

The captions must be *learnable* by a small attention captioner on features of
a randomly initialised InceptionV3, which carry colour, shape, size and coarse
position. So every caption is a function of those four things only: each image
gets the same five templates (the wording differs between templates, like
COCO's five annotators, not at random), and everything random (shade of the
background, noise, exact placement, capitals and full stops) is either
invisible after text normalisation or never mentioned.

    python -m pipelines.synthetic --output DIR [--train 1500] [--val 200] [--seed 0] [--novel-pairs N]
                                  [--language en|zh]

--novel-pairs N makes a split for generalisation: N (colour, shape) pairs, drawn from the seed,
appear in no training scene, and NOVEL_SHARE of the val scenes each hold one of them beside seen
pairs (the rest hold seen pairs only). Both annotation files name the pairs (info.novel_pairs)
and each val image says whether it holds one ("novel_pair" in the instances file's images), so
evaluation scores the novel scenes apart from the rest. Without the flag the files are as before.

--language zh writes the captions in Chinese (no spaces between words; the same content, five
wordings of their own), over the same pictures: the seed draws the same scenes in either language.
The instances file keeps the English category names and colours, which evaluation compares, and
both files say the captions' language (info.language). English, the default, writes no such key.
"""
from __future__ import annotations

if __name__ == "__main__":  # the quiet start, as every command has it (see caption_io/quiet.py)
    from caption_io import quiet

    quiet.install()

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

from caption_io import cli
from caption_io.scenes import COLOURS, COLUMNS, ROWS, SHAPES, SIZES, ZH, objects_in_caption  # noqa: F401

# The scene set's words (COLOURS, SHAPES, SIZES, the grid's COLUMNS and ROWS) and the reading of a
# caption's objects (objects_in_caption) are caption_io.scenes', where evaluation reads them too.

WIDTH, HEIGHT = 320, 240  # deliberately not 299x299: the pipeline must resize
JPEG_QUALITY = 90
SPLITS = ("train", "val")
LANGUAGES = ("en", "zh")

# Saturated colours far from the greyish background (and from each other), so
# "red" stays red after JPEG, noise and the encoder's resize.
_RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
        "yellow": (240, 210, 40), "white": (245, 245, 245), "black": (20, 20, 20)}
# Side length in pixels. The gap between the ranges keeps "small" and "large"
# unambiguous; the large range still fits a grid cell with a margin. Even a
# small object spans more than one cell of the encoder's 8x8 grid (299/8 ~ 37
# px): a shape inside one cell is a blob to a random-weight InceptionV3, and
# its word would not be learnable from the picture.
_SIDE = {"small": (44, 56), "large": (76, 94)}
_MARGIN = 6
_OBJECT_COUNT_P = (0.40, 0.35, 0.25)  # share of 1-, 2- and 3-object scenes
# Split s draws image ids from [s * _ID_BLOCK + 1, (s + 1) * _ID_BLOCK): unique
# across splits, scattered like COCO's (so nothing can assume id == row index),
# and a split's ids do not depend on the other split's size.
_ID_BLOCK = 1_000_000
KINDS = len(COLOURS) * len(SHAPES)  # (colour, shape) pairs; kind k is COLOURS[k // 3], SHAPES[k % 3]
NOVEL_SHARE = 0.5  # of the val scenes, with --novel-pairs: each holds one held-out pair


def _cell(bbox) -> tuple[int, int]:
    """(column, row) index of the grid cell holding a box's centre."""
    x, y, w, h = bbox
    col = min(int((x + w / 2) * len(COLUMNS) // WIDTH), len(COLUMNS) - 1)
    row = min(int((y + h / 2) * len(ROWS) // HEIGHT), len(ROWS) - 1)
    return col, row


def _kinds(rng: np.random.Generator, k: int, held_out: tuple[int, ...], novel: bool) -> np.ndarray:
    """k distinct kinds: with held-out kinds, one of them first when `novel`, the others from
    the rest (no held-out kind at all when not); without, any k (the stream as it always was)."""
    if not held_out:
        return rng.choice(KINDS, size=k, replace=False)
    seen = np.setdiff1d(np.arange(KINDS), held_out)
    if not novel:
        return rng.choice(seen, size=k, replace=False)
    return np.concatenate([[rng.choice(held_out)], rng.choice(seen, size=k - 1, replace=False)])


def _sample_scene(rng: np.random.Generator, held_out: tuple[int, ...] = (), novel: bool = False) -> list[dict]:
    k = int(rng.choice(3, p=_OBJECT_COUNT_P)) + 1
    cells = rng.choice(len(COLUMNS) * len(ROWS), size=k, replace=False)
    # Distinct (colour, shape) pairs within a scene, so the set of pairs a
    # caption names identifies the objects exactly (no "two red circles").
    kinds = _kinds(rng, k, held_out, novel)
    cell_w, cell_h = WIDTH // len(COLUMNS), HEIGHT // len(ROWS)
    objects = []
    for cell, kind in zip(cells, kinds):
        col, row = divmod(int(cell), len(ROWS))
        colour, shape = COLOURS[kind // len(SHAPES)], SHAPES[kind % len(SHAPES)]
        size = SIZES[int(rng.integers(len(SIZES)))]
        side = int(rng.integers(_SIDE[size][0], _SIDE[size][1] + 1))
        x0, y0 = col * cell_w + _MARGIN, row * cell_h + _MARGIN
        x = int(rng.integers(x0, x0 + cell_w - 2 * _MARGIN - side + 1))
        y = int(rng.integers(y0, y0 + cell_h - 2 * _MARGIN - side + 1))
        objects.append({"colour": colour, "shape": shape, "size": size, "bbox": [x, y, side, side]})
    # The order captions mention objects in: left to right, then top to bottom.
    objects.sort(key=lambda o: _cell(o["bbox"]))
    return objects


def _render(objects: list[dict], rng: np.random.Generator) -> Image.Image:
    # Greyish background with a slight tint and vertical gradient, so images
    # are not trivially identical outside the shapes; none of it is captioned.
    grey = rng.uniform(100, 160) + rng.uniform(-10, 10, size=3)
    gradient = rng.uniform(-12, 12) * np.linspace(-1, 1, HEIGHT, dtype=np.float32)
    background = grey[None, None, :] + gradient[:, None, None] + np.zeros((1, WIDTH, 1))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        fill = tuple(int(v) for v in np.clip(np.add(_RGB[obj["colour"]], rng.integers(-12, 13, 3)), 0, 255))
        x, y, w, h = obj["bbox"]
        box = [x, y, x + w - 1, y + h - 1]  # PIL boxes are inclusive: stay inside bbox
        if obj["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x + (w - 1) / 2, y), (x, y + h - 1), (x + w - 1, y + h - 1)], fill=fill)
    # A third of the images are plain; the rest get light sensor-like noise.
    if rng.random() >= 1 / 3:
        noise = rng.standard_normal((HEIGHT, WIDTH, 3), dtype=np.float32) * rng.uniform(2, 7)
        image = Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))
    return image


def _area(obj: dict) -> float:
    _, _, w, h = obj["bbox"]
    return {"circle": np.pi * w * h / 4, "square": float(w * h), "triangle": w * h / 2}[obj["shape"]]


def _phrase(obj: dict, sized: bool = False) -> str:
    return f"a {obj['size'] + ' ' if sized else ''}{obj['colour']} {obj['shape']}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions_for(objects: list[dict], language: str = "en") -> list[str]:
    """The five captions (canonical: lower case, no punctuation but commas/colons; in Chinese
    "、" between the items of a list, no full stop) of a scene, given its objects as dicts with
    colour, shape, size and bbox.

    A pure function of what the picture shows: the five differ in wording, not
    in content, and objects are named left to right, then top to bottom.
    """
    objects = sorted(objects, key=lambda o: _cell(o["bbox"]))
    if language == "zh":
        return _captions_zh(objects)
    where = [(COLUMNS[c], ROWS[r]) for c, r in (_cell(o["bbox"]) for o in objects)]
    plain = _join([_phrase(o) for o in objects])
    sized = _join([_phrase(o, sized=True) for o in objects])
    if len(objects) == 1:
        (obj,), ((col, row),) = objects, where
        side = "in the middle of the picture" if col == "middle" else f"on the {col} side of the picture"
        return [f"{sized} in the {row} {col}",
                f"there is {sized} {side}",
                f"a picture showing {plain}",
                f"a single {obj['colour']} {obj['shape']} near the {row}",
                f"{plain} on a grey background"]
    count = {2: "two", 3: "three"}[len(objects)]
    placed = _join([f"{_phrase(o)} in the {row} {col}" for o, (col, row) in zip(objects, where)])
    if len(objects) == 2:
        # Same column means the first is the upper one (top-to-bottom order).
        relation = "to the left of" if where[0][0] != where[1][0] else "above"
        last = f"{_phrase(objects[0], True)} {relation} {_phrase(objects[1], True)}"
    else:
        last = f"{plain} on a grey background"
    return [sized, f"there are {count} shapes: {plain}", f"a picture showing {plain}", placed, last]


def _zh_thing(obj: dict, linked: bool = True, sized: bool = False) -> str:
    """"红色的圆形" (linked), "红色圆形"; sized: "小的红色圆形". The size goes before the colour:
    the colour and shape stay together, as objects_in_caption reads them."""
    size = ZH[obj["size"]] + "的" if sized else ""
    return f"{size}{ZH[obj['colour']]}{'的' if linked else ''}{ZH[obj['shape']]}"


def _zh_place(col: str, row: str) -> str:
    """The grid cell: "左上方", "右下方", "上方中间"."""
    return f"{ZH[row]}方{ZH[col]}" if col == "middle" else f"{ZH[col]}{ZH[row]}方"


def _zh_join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else "、".join(parts[:-1]) + "和" + parts[-1]


def _captions_zh(objects: list[dict]) -> list[str]:
    """captions_for's five in Chinese, objects in caption order. The sentences are Chinese ones,
    not the English word for word; what each says matches its English counterpart."""
    where = [(COLUMNS[c], ROWS[r]) for c, r in (_cell(o["bbox"]) for o in objects)]
    if len(objects) == 1:
        (obj,), ((col, row),) = objects, where
        side = ZH[col] if col == "middle" else ZH[col] + "边"
        size = "较" + ZH[obj["size"]]
        return [f"一个{_zh_thing(obj, False, sized=True)}在{_zh_place(col, row)}",
                f"图片{side}有一个{_zh_thing(obj)}，尺寸{size}",
                f"画面里有一个{_zh_thing(obj)}",
                f"只有一个{_zh_thing(obj, False)}，靠近图片{ZH[row]}边",
                f"一个{_zh_thing(obj, False)}，背景是灰色的"]
    count = {2: "两", 3: "三"}[len(objects)]
    plain = _zh_join([_zh_thing(o) for o in objects])
    placed = _zh_join([f"{_zh_place(col, row)}的{_zh_thing(o, False)}" for o, (col, row) in zip(objects, where)])
    if len(objects) == 2:
        # Same column means the first is the upper one (top-to-bottom order).
        relation = "左边" if where[0][0] != where[1][0] else "上面"
        last = f"一个{_zh_thing(objects[0], False, True)}在{_zh_thing(objects[1], False, True)}的{relation}"
    else:
        last = _zh_join([_zh_thing(o, False) for o in objects]) + "，背景是灰色的"
    return [_zh_join([f"一个{_zh_thing(o, False, True)}" for o in objects]),
            f"有{count}个图形：{plain}",
            "画面里有" + _zh_join([f"一个{_zh_thing(o)}" for o in objects]),
            placed, last]


def _annotator_style(caption: str, rng: np.random.Generator, language: str = "en") -> str:
    # Real COCO captions are inconsistently capitalised and punctuated; the
    # project's normalisation removes both, so this adds no content to learn.
    # Chinese has no capitals: its lists are written with "，" as often as with "、". Either way
    # two draws, so the pictures do not depend on the language.
    if rng.random() < 0.4:
        caption = caption.replace("、", "，") if language == "zh" else caption[0].upper() + caption[1:]
    if rng.random() < 0.3:
        caption += "。" if language == "zh" else "."
    return caption


def scene_objects(instances_json_path: str) -> dict[int, list[dict]]:
    """image id -> its objects ({"colour", "shape", "size", "bbox", "area"}), in
    caption order, read back from an instances_{split}2014.json file."""
    with open(instances_json_path) as f:
        instances = json.load(f)
    names = {c["id"]: c["name"] for c in instances["categories"]}
    scenes = {image["id"]: [] for image in instances["images"]}
    for ann in sorted(instances["annotations"], key=lambda a: a["id"]):
        scenes[ann["image_id"]].append({"colour": ann["colour"], "shape": names[ann["category_id"]],
                                        "size": ann["size"], "bbox": ann["bbox"], "area": ann["area"]})
    return scenes


def _write_json(path: str, obj) -> None:
    # Write-then-rename: a JSON file that exists is complete, and it is written
    # after the images it lists.
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def novel_kinds(n: int, seed: int) -> tuple[int, ...]:
    """The n held-out kinds of a seed, from a stream of their own (the scenes' draws do not
    shift with n), sorted."""
    if not 0 <= n < KINDS:
        raise ValueError(f"novel_pairs must be in [0, {KINDS - 1}] (there are {KINDS} colour-shape pairs), got {n}")
    return tuple(sorted(int(k) for k in np.random.default_rng([seed, 7]).choice(KINDS, size=n, replace=False)))


def _pair(kind: int) -> list[str]:
    return [COLOURS[kind // len(SHAPES)], SHAPES[kind % len(SHAPES)]]


def _generate_split(output_dir: str, split: str, n: int, seed: int, held_out: tuple[int, ...] = (),
                    language: str = "en") -> dict:
    index = SPLITS.index(split)
    # One stream per split, so the val set does not change with --train.
    rng = np.random.default_rng([seed, index])
    # A second stream decides which val scenes get a novel pair, so the first one draws as before.
    novelty = np.random.default_rng([seed, index, 7])
    ids = np.sort(rng.choice(_ID_BLOCK - 1, size=n, replace=False)) + 1 + index * _ID_BLOCK
    image_dir = os.path.join(output_dir, f"{split}2014")
    os.makedirs(image_dir, exist_ok=True)
    info = {"description": "Synthetic shapes scene set in COCO 2014 format", "version": "1.0",
            "year": 2014, "contributor": "pipelines.synthetic", "url": "",
            "date_created": "2014-01-01", "seed": seed}
    if held_out:
        info["novel_pairs"] = [_pair(k) for k in held_out]
    if language != "en":
        info["language"] = language
    images, captions, instances = [], [], []
    for image_id in (int(i) for i in ids):
        novel = bool(held_out) and split != "train" and novelty.random() < NOVEL_SHARE
        objects = _sample_scene(rng, held_out, novel)
        file_name = f"COCO_{split}2014_{image_id:012d}.jpg"
        _render(objects, rng).save(os.path.join(image_dir, file_name), "JPEG", quality=JPEG_QUALITY)
        images.append({"id": image_id, "file_name": file_name, "width": WIDTH, "height": HEIGHT})
        if held_out:
            images[-1]["novel_pair"] = novel
        # Annotation ids derive from the image id: unique across files and
        # stable whatever else is generated.
        for k, caption in enumerate(captions_for(objects, language)):
            captions.append({"id": image_id * 10 + k, "image_id": image_id,
                             "caption": _annotator_style(caption, rng, language)})
        for k, obj in enumerate(objects):
            instances.append({"id": image_id * 10 + k, "image_id": image_id,
                              "category_id": SHAPES.index(obj["shape"]) + 1, "bbox": obj["bbox"],
                              "area": round(_area(obj), 2), "iscrowd": 0,
                              "colour": obj["colour"], "size": obj["size"]})
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    captions_json = os.path.join(output_dir, "annotations", f"captions_{split}2014.json")
    instances_json = os.path.join(output_dir, "annotations", f"instances_{split}2014.json")
    _write_json(captions_json, {"info": info, "licenses": [], "images": images, "annotations": captions})
    _write_json(instances_json, {"info": info, "licenses": [], "images": images,
                                 "annotations": instances, "categories": categories})
    out = {"images": n, "captions": len(captions), "objects": len(instances), "image_dir": image_dir,
           "captions_json": captions_json, "instances_json": instances_json}
    if held_out:
        out["novel_scenes"] = sum(1 for im in images if im["novel_pair"])
    return out


def generate(output_dir: str, n_train: int = 1500, n_val: int = 200, seed: int = 0, novel_pairs: int = 0,
             language: str = "en") -> dict:
    """Write the scene set under output_dir; returns paths and counts per split (and the
    held-out pairs, with novel_pairs > 0; the language, when not English: see the module docstring)."""
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, got {language!r}")
    for name, n in (("n_train", n_train), ("n_val", n_val)):
        if not 0 <= n < _ID_BLOCK:
            raise ValueError(f"{name} must be in [0, {_ID_BLOCK - 1}], got {n}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    held_out = novel_kinds(novel_pairs, seed)
    output_dir = os.fspath(output_dir)
    os.makedirs(os.path.join(output_dir, "annotations"), exist_ok=True)
    splits = {split: _generate_split(output_dir, split, n, seed, held_out, language)
              for split, n in zip(SPLITS, (n_train, n_val))}
    out = {"output_dir": output_dir, "seed": seed, "splits": splits}
    if held_out:
        out["novel_pairs"] = [_pair(k) for k in held_out]
    if language != "en":
        out["language"] = language
    return out


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n < _ID_BLOCK:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to {_ID_BLOCK - 1}, got {text!r}")
    return n


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(prog="pipelines.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="directory to write the scene set into")
    parser.add_argument("--train", type=_count, default=1500, help="number of train2014 images")
    parser.add_argument("--val", type=_count, default=200, help="number of val2014 images")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same files")
    parser.add_argument("--novel-pairs", type=int, default=0, metavar="N",
                        help="hold N colour-shape pairs out of training and put one into "
                             f"{NOVEL_SHARE:.0%}% of the val scenes (default 0: none)")
    parser.add_argument("--language", choices=LANGUAGES, default="en",
                        help="the captions' language: en (default) or zh, Chinese over the same pictures")
    args = parser.parse_args(argv)
    try:
        summary = generate(args.output, args.train, args.val, args.seed, args.novel_pairs, args.language)
    except ValueError as e:
        parser.error(str(e))
    except OSError as e:
        parser.error(f"cannot write the scene set to {args.output!r}: {e.strerror or e}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
