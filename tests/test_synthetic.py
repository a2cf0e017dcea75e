"""The synthetic COCO-format scene set: formats, consistency with the pictures, determinism, CLI."""
import collections
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import synthetic
from tests.conftest import exit_code

REPO = Path(__file__).resolve().parents[1]

# Reference colours of our own (not the module's palette): a pixel at a shape's
# centre must be nearer its named colour than any other colour or the grey background.
REFERENCE_RGB = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255),
                 "yellow": (255, 255, 0), "white": (255, 255, 255), "black": (0, 0, 0),
                 "background": (128, 128, 128)}


def words(text):
    """The project's normalisation in plain Python: lower case, punctuation to spaces."""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def load(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    summary = synthetic.generate(out, n_train=150, n_val=30, seed=3)
    return out, summary


def split_files(out, split):
    return (load(out / "annotations" / f"captions_{split}2014.json"),
            load(out / "annotations" / f"instances_{split}2014.json"))


def test_summary_matches_files(scene_set):
    out, summary = scene_set
    for split, n in (("train", 150), ("val", 30)):
        s = summary["splits"][split]
        assert s["images"] == n and s["captions"] == 5 * n
        assert Path(s["captions_json"]) == out / "annotations" / f"captions_{split}2014.json"
        assert len(os.listdir(s["image_dir"])) == n


def test_captions_json_is_coco_format(scene_set):
    out, _ = scene_set
    image_ids, caption_ids = [], []
    for split in synthetic.SPLITS:
        captions, _ = split_files(out, split)
        assert set(captions) >= {"info", "licenses", "images", "annotations"}
        assert captions["licenses"] == []
        images = {im["id"]: im for im in captions["images"]}
        assert len(images) == len(captions["images"])
        per_image = collections.Counter(a["image_id"] for a in captions["annotations"])
        assert set(per_image) == set(images)  # every annotation's image exists, and vice versa
        assert set(per_image.values()) == {5}
        for ann in captions["annotations"]:
            assert set(ann) == {"id", "image_id", "caption"}
            assert isinstance(ann["caption"], str) and ann["caption"].strip()
        for im in images.values():
            assert im["file_name"] == f"COCO_{split}2014_{im['id']:012d}.jpg"
        # Annotator-like style that text normalisation must undo: some captions
        # capitalised, some with a full stop, most neither.
        texts = [a["caption"] for a in captions["annotations"]]
        assert 0.1 < sum(t[0].isupper() for t in texts) / len(texts) < 0.7
        assert 0.1 < sum(t.endswith(".") for t in texts) / len(texts) < 0.7
        image_ids += images
        caption_ids += [a["id"] for a in captions["annotations"]]
    assert len(set(image_ids)) == len(image_ids)  # unique across both splits
    assert len(set(caption_ids)) == len(caption_ids)


def test_images_exist_and_decode_to_stated_size(scene_set):
    out, _ = scene_set
    for split in synthetic.SPLITS:
        captions, _ = split_files(out, split)
        for im in captions["images"]:
            with Image.open(out / f"{split}2014" / im["file_name"]) as img:
                assert img.format == "JPEG" and img.mode == "RGB"
                assert img.size == (im["width"], im["height"])
                assert img.size != (299, 299)  # the pipeline must really resize
                img.load()


def test_instances_boxes_inside_and_disjoint(scene_set):
    out, _ = scene_set
    for split in synthetic.SPLITS:
        captions, instances = split_files(out, split)
        assert instances["images"] == captions["images"]
        assert [c["name"] for c in instances["categories"]] == list(synthetic.SHAPES)
        assert len({c["id"] for c in instances["categories"]}) == len(synthetic.SHAPES)
        size = {im["id"]: (im["width"], im["height"]) for im in instances["images"]}
        assert len({a["id"] for a in instances["annotations"]}) == len(instances["annotations"])
        boxes = collections.defaultdict(list)
        for ann in instances["annotations"]:
            assert ann["iscrowd"] == 0
            assert ann["colour"] in synthetic.COLOURS and ann["size"] in synthetic.SIZES
            x, y, w, h = ann["bbox"]
            width, height = size[ann["image_id"]]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= width and y + h <= height
            assert 0 < ann["area"] <= w * h
            boxes[ann["image_id"]].append(ann["bbox"])
        assert set(boxes) == set(size)  # every image has objects
        for bs in boxes.values():
            assert 1 <= len(bs) <= 3
            for (x1, y1, w1, h1), (x2, y2, w2, h2) in itertools.combinations(bs, 2):
                assert x1 + w1 <= x2 or x2 + w2 <= x1 or y1 + h1 <= y2 or y2 + h2 <= y1


def test_object_counts_and_sizes_are_varied(scene_set):
    out, _ = scene_set
    scenes = synthetic.scene_objects(out / "annotations" / "instances_train2014.json")
    share = collections.Counter(len(v) for v in scenes.values())
    n = len(scenes)
    assert 0.25 < share[1] / n < 0.55 and 0.2 < share[2] / n < 0.5 and 0.1 < share[3] / n < 0.4
    objects = [o for v in scenes.values() for o in v]
    assert {o["colour"] for o in objects} == set(synthetic.COLOURS)
    assert {o["shape"] for o in objects} == set(synthetic.SHAPES)
    # "small" and "large" must be told apart by the picture: their sides never overlap.
    small = [o["bbox"][2] for o in objects if o["size"] == "small"]
    large = [o["bbox"][2] for o in objects if o["size"] == "large"]
    assert small and large and max(small) < min(large)


def test_every_caption_names_exactly_the_scene_objects(scene_set):
    out, _ = scene_set
    for split in synthetic.SPLITS:
        captions, _ = split_files(out, split)
        scenes = synthetic.scene_objects(out / "annotations" / f"instances_{split}2014.json")
        for ann in captions["annotations"]:
            objects = scenes[ann["image_id"]]
            assert synthetic.objects_in_caption(ann["caption"]) == \
                {(o["colour"], o["shape"]) for o in objects}, ann


def test_captions_are_determined_by_the_picture(scene_set):
    out, _ = scene_set
    captions, _ = split_files(out, "train")
    scenes = synthetic.scene_objects(out / "annotations" / "instances_train2014.json")
    by_image = collections.defaultdict(list)
    for ann in captions["annotations"]:
        by_image[ann["image_id"]].append(words(ann["caption"]))
    vocab = set()
    for image_id, got in by_image.items():
        objects = scenes[image_id]
        # The five captions, once normalised, are a function of the instance data alone.
        assert sorted(got) == sorted(words(c) for c in synthetic.captions_for(objects))
        assert len({tuple(c) for c in got}) == 5  # five different wordings
        vocab.update(w for c in got for w in c)
        # Objects are named left to right, then top to bottom.
        named = [(c, s) for caption in got for c, s in zip(caption, caption[1:])
                 if c in synthetic.COLOURS and s in synthetic.SHAPES]
        expected = [(o["colour"], o["shape"]) for o in objects]
        assert named == expected * 5
        cells = [((x + w / 2) * 3 // 320, (y + h / 2) * 2 // 240) for x, y, w, h in (o["bbox"] for o in objects)]
        assert cells == sorted(cells)
        # Sizes, where said, are right.
        sized = [caption for caption in got if synthetic.SIZES[0] in caption or synthetic.SIZES[1] in caption]
        for caption in sized:
            assert [w for w in caption if w in synthetic.SIZES] == [o["size"] for o in objects]
    assert len(vocab) < 60
    assert set(synthetic.COLOURS) | set(synthetic.SHAPES) | set(synthetic.SIZES) <= vocab


def test_single_object_captions_say_where_it_is(scene_set):
    out, _ = scene_set
    captions, _ = split_files(out, "train")
    scenes = synthetic.scene_objects(out / "annotations" / "instances_train2014.json")
    seen = set()
    for ann in captions["annotations"]:
        objects = scenes[ann["image_id"]]
        if len(objects) != 1 or " in the " not in ann["caption"].lower():
            continue
        x, y, w, h = objects[0]["bbox"]
        col = ("left", "middle", "right")[int((x + w / 2) * 3 // 320)]
        row = "top" if y + h / 2 < 120 else "bottom"
        text = " ".join(words(ann["caption"]))
        assert f"in the {row} {col}" in text or (col == "middle" and "in the middle of" in text)
        seen.add((row, col))
    assert len(seen) >= 4  # the test did look at varied places


def test_pixel_at_box_centre_has_the_named_colour(scene_set):
    out, _ = scene_set
    names = list(REFERENCE_RGB)
    reference = np.array([REFERENCE_RGB[n] for n in names], np.float32)
    scenes = synthetic.scene_objects(out / "annotations" / "instances_val2014.json")
    captions, _ = split_files(out, "val")
    for im in captions["images"]:
        pixels = np.asarray(Image.open(out / "val2014" / im["file_name"]).convert("RGB"), np.float32)
        for obj in scenes[im["id"]]:
            x, y, w, h = obj["bbox"]
            cx, cy = int(x + w / 2), int(y + h / 2)
            patch = np.median(pixels[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3), axis=0)
            nearest = names[int(np.argmin(((reference - patch) ** 2).sum(axis=1)))]
            assert nearest == obj["colour"], (im["file_name"], obj, patch)
        # ... and a corner (never covered: objects keep a margin) is background.
        corner = pixels[:3, :3].reshape(-1, 3).mean(axis=0)
        assert names[int(np.argmin(((reference - corner) ** 2).sum(axis=1)))] == "background"


def tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_different_seed_differs(tmp_path):
    synthetic.generate(tmp_path / "a", n_train=6, n_val=3, seed=11)
    synthetic.generate(tmp_path / "b", n_train=6, n_val=3, seed=11)
    synthetic.generate(tmp_path / "c", n_train=6, n_val=3, seed=12)
    a, b, c = (tree_bytes(tmp_path / d) for d in "abc")
    assert a == b
    assert len(a) == 9 + 4
    key = "annotations/captions_train2014.json"
    assert a[key] != c[key]
    assert set(v for k, v in a.items() if k.endswith(".jpg")).isdisjoint(v for k, v in c.items() if k.endswith(".jpg"))


def test_val_does_not_depend_on_train_size(tmp_path):
    synthetic.generate(tmp_path / "a", n_train=2, n_val=4, seed=5)
    synthetic.generate(tmp_path / "b", n_train=7, n_val=4, seed=5)
    a, b = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    val = [k for k in a if "val" in k]
    assert len(val) == 4 + 2 and all(a[k] == b[k] for k in val)


def test_objects_in_caption():
    f = synthetic.objects_in_caption
    assert f("A small Red circle to the left of a large blue square.") == {("red", "circle"), ("blue", "square")}
    assert f("there are three shapes: a white triangle, a black circle and a yellow triangle") == \
        {("white", "triangle"), ("black", "circle"), ("yellow", "triangle")}
    assert f("two red circles") == {("red", "circle")}
    assert f("a picture showing a grey background") == set()
    assert f("a red large circle") == set()  # only "colour shape" counts


def test_generate_rejects_bad_counts(tmp_path):
    with pytest.raises(ValueError):
        synthetic.generate(tmp_path, n_train=-1)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.synthetic", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_cli_writes_scene_set(tmp_path):
    result = run_cli("--output", str(tmp_path), "--train", "3", "--val", "2", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["splits"]["val"]["images"] == 2
    for split, n in (("train", 3), ("val", 2)):
        assert len(load(tmp_path / "annotations" / f"captions_{split}2014.json")["images"]) == n
        assert (tmp_path / "annotations" / f"instances_{split}2014.json").exists()
        assert len(list((tmp_path / f"{split}2014").glob(f"COCO_{split}2014_*.jpg"))) == n
    # The CLI and the API agree byte for byte.
    synthetic.generate(tmp_path / "api", n_train=3, n_val=2, seed=1)
    assert (tmp_path / "annotations" / "captions_train2014.json").read_bytes() == \
        (tmp_path / "api" / "annotations" / "captions_train2014.json").read_bytes()


@pytest.mark.parametrize("bad", [
    ["--output", "OUT", "--train", "-1"],
    ["--output", "OUT", "--val", "-5"],
    ["--output", "OUT", "--train", "many"],
    ["--output", "OUT", "--seed", "-2"],
    ["--output", "OUT", "--novel-pairs", "18"],  # there are 18 pairs: none would be left to train on
    ["--output", "OUT", "--language", "fr"],
    ["--output", "FILE/sub", "--train", "1", "--val", "1"],  # unwritable: a file is in the way
    ["--train", "1"],  # no --output
])
def test_cli_bad_flag_exits_with_one_line(tmp_path, bad, capsys, clean_logging):
    # In-process (test_cli_writes_scene_set runs the command as a process).
    (tmp_path / "FILE").write_text("a regular file, so nothing can be written under it")
    args = [a.replace("FILE", str(tmp_path / "FILE")).replace("OUT", str(tmp_path / "out")) for a in bad]
    assert exit_code(synthetic.main, args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], lines
    assert "Traceback" not in lines[0]


# ----------------------------------------------------------- held-out pairs (--novel-pairs)
def pairs_of(objects):
    return {(o["colour"], o["shape"]) for o in objects}


def test_novel_pairs_are_never_trained_on_and_one_sits_in_half_the_val_scenes(tmp_path):
    summary = synthetic.generate(tmp_path, n_train=300, n_val=200, seed=4, novel_pairs=3)
    held = {tuple(p) for p in summary["novel_pairs"]}
    assert len(held) == 3
    for split in synthetic.SPLITS:
        captions, instances = split_files(tmp_path, split)
        for data in (captions, instances):  # both files name the pairs
            assert {tuple(p) for p in data["info"]["novel_pairs"]} == held
    train = synthetic.scene_objects(str(tmp_path / "annotations" / "instances_train2014.json"))
    assert all(not pairs_of(objs) & held for objs in train.values())
    # Every other pair is still trained on, alone and beside others.
    assert set().union(*map(pairs_of, train.values())) == {(c, s) for c in synthetic.COLOURS
                                                           for s in synthetic.SHAPES} - held
    _, instances = split_files(tmp_path, "val")
    val = synthetic.scene_objects(str(tmp_path / "annotations" / "instances_val2014.json"))
    flags = {im["id"]: im["novel_pair"] for im in instances["images"]}
    for image_id, objs in val.items():
        assert len(pairs_of(objs) & held) == (1 if flags[image_id] else 0), objs
    novel = sum(flags.values())
    assert summary["splits"]["val"]["novel_scenes"] == novel and 0.4 < novel / 200 < 0.6
    assert {p for image_id, objs in val.items() if flags[image_id] for p in pairs_of(objs) & held} == held


def test_the_held_out_pairs_follow_the_seed_alone_and_no_flag_writes_none(tmp_path):
    one = synthetic.generate(tmp_path / "a", n_train=5, n_val=4, seed=2, novel_pairs=2)["novel_pairs"]
    assert synthetic.generate(tmp_path / "b", n_train=9, n_val=2, seed=2, novel_pairs=2)["novel_pairs"] == one
    assert synthetic.generate(tmp_path / "c", n_train=5, n_val=4, seed=3, novel_pairs=2)["novel_pairs"] != one
    assert "novel_pairs" not in synthetic.generate(tmp_path / "d", n_train=5, n_val=4, seed=2)
    captions, instances = split_files(tmp_path / "d", "val")
    assert "novel_pairs" not in captions["info"] and all("novel_pair" not in im for im in instances["images"])




# ----------------------------------------------------------------- Chinese captions (--language zh)
ZH_PUNCTUATION = "、，。："


def spaced(text):
    """The project's normalisation of a Chinese caption in plain Python: punctuation to spaces,
    each character a word of its own."""
    return " ".join(ch for ch in text if ch not in ZH_PUNCTUATION)


def named_in_order(caption):
    """The (colour, shape) pairs of a Chinese caption in the order it names them."""
    canonical = {synthetic.ZH[w]: w for w in synthetic.COLOURS + synthetic.SHAPES}
    colours = "|".join(synthetic.ZH[c] for c in synthetic.COLOURS)
    shapes = "|".join(synthetic.ZH[s] for s in synthetic.SHAPES)
    return [(canonical[c], canonical[s]) for c, s in re.findall(f"({colours})的?({shapes})", caption)]


@pytest.fixture(scope="module")
def zh_scene_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes_zh")
    summary = synthetic.generate(out, n_train=80, n_val=20, seed=3, language="zh")
    return out, summary


def test_chinese_captions_name_exactly_the_objects_in_five_wordings(zh_scene_set):
    out, summary = zh_scene_set
    assert summary["language"] == "zh"
    for split in synthetic.SPLITS:
        captions, instances = split_files(out, split)
        assert captions["info"]["language"] == instances["info"]["language"] == "zh"
        scenes = synthetic.scene_objects(out / "annotations" / f"instances_{split}2014.json")
        by_image = collections.defaultdict(list)
        for ann in captions["annotations"]:
            by_image[ann["image_id"]].append(ann["caption"])
        for image_id, texts in by_image.items():
            objects = scenes[image_id]
            pairs = [(o["colour"], o["shape"]) for o in objects]
            assert len(texts) == 5 and len({spaced(t) for t in texts}) == 5
            # The five, punctuation aside, are the scene's: a function of the instance data alone.
            assert sorted(map(spaced, texts)) == sorted(map(spaced, synthetic.captions_for(objects, "zh")))
            for text in texts:
                assert not re.search(r"[A-Za-z\s]", text), text  # Chinese, written without spaces
                assert synthetic.objects_in_caption(text) == set(pairs), text
                assert synthetic.objects_in_caption(spaced(text)) == set(pairs), text
                assert named_in_order(text) == pairs, text  # left to right, then top to bottom
                sizes = [ch for ch in text if ch in (synthetic.ZH["small"], synthetic.ZH["large"])]
                assert sizes in ([], [synthetic.ZH[o["size"]] for o in objects]), text


def test_chinese_annotator_style_adds_no_content(zh_scene_set):
    out, _ = zh_scene_set
    captions, _ = split_files(out, "train")
    texts = [a["caption"] for a in captions["annotations"]]
    assert 0.1 < sum(t.endswith("。") for t in texts) / len(texts) < 0.5
    # Three-object lists: written with "、" or, by some annotators, "，".
    lists = [t for t in texts if t.startswith("有三个图形")]
    assert any("、" in t for t in lists) and any("、" not in t for t in lists)


def test_one_object_chinese_captions_say_where_it_is(zh_scene_set):
    out, _ = zh_scene_set
    scenes = synthetic.scene_objects(out / "annotations" / "instances_train2014.json")
    seen = set()
    for objects in scenes.values():
        if len(objects) != 1:
            continue
        x, y, w, h = objects[0]["bbox"]
        col = ("左", "中间", "右")[int((x + w / 2) * 3 // 320)]
        row = "上" if y + h / 2 < 120 else "下"
        place = f"{row}方{col}" if col == "中间" else f"{col}{row}方"
        first = synthetic.captions_for(objects, "zh")[0]
        assert first.endswith(f"在{place}"), (first, objects)
        seen.add(place)
    assert len(seen) >= 4


def test_chinese_captions_are_over_the_same_pictures_and_objects(zh_scene_set, tmp_path):
    out, _ = zh_scene_set
    synthetic.generate(tmp_path, n_train=80, n_val=20, seed=3)
    en, zh = tree_bytes(tmp_path), tree_bytes(out)
    assert {k: v for k, v in en.items() if k.endswith(".jpg")} == {k: v for k, v in zh.items() if k.endswith(".jpg")}
    for split in synthetic.SPLITS:
        (_, en_instances), (_, zh_instances) = split_files(tmp_path, split), split_files(out, split)
        assert "language" not in en_instances["info"]
        assert {**zh_instances, "info": en_instances["info"]} == en_instances  # English names, colours


def test_english_files_are_as_they_were_before_the_language_flag(tmp_path):
    # Digests of the files the generator wrote before Chinese captions existed: English stays byte-identical.
    synthetic.generate(tmp_path, n_train=6, n_val=3, seed=11)
    digest = {name: hashlib.sha256((tmp_path / "annotations" / name).read_bytes()).hexdigest()
              for name in ("captions_train2014.json", "instances_val2014.json")}
    assert digest == {"captions_train2014.json": "a02ada4f7aed2eed8420f98d66870eea2be12173c942bf27ed67fe86a04c3f11",
                      "instances_val2014.json": "4987b8254d7233fe09b0c3343805880925d416ec1923784b2a86295b1efddddb"}


def test_objects_in_chinese_captions():
    f = synthetic.objects_in_caption
    red_circle = {("red", "circle")}
    for text in ("一个红色的圆形在左上方", "一 个 红 色 的 圆 形 在 左 上 方", "红色圆形", "红圆形", "红的圆形"):
        assert f(text) == red_circle, text
    assert f("左上方的红色圆形、上方中间的黄色三角形和右下方的蓝色正方形。") == \
        {("red", "circle"), ("yellow", "triangle"), ("blue", "square")}
    assert f("有三个图形，背景是灰色的") == set()  # "三" is three here, not a triangle
    assert f("红色的圆") == set() and f("红色的小圆形") == set()  # only "colour (的) shape" counts
    assert f("a red circle beside 蓝色的正方形") == {("red", "circle"), ("blue", "square")}


def test_cli_writes_chinese_captions(tmp_path, capsys, clean_logging):
    assert exit_code(synthetic.main, ["--output", str(tmp_path), "--train", "2", "--val", "1",
                                      "--language", "zh"]) == 0
    assert json.loads(capsys.readouterr().out)["language"] == "zh"
    captions = load(tmp_path / "annotations" / "captions_val2014.json")
    assert captions["info"]["language"] == "zh" and len(captions["annotations"]) == 5
    with pytest.raises(ValueError, match="language"):
        synthetic.generate(tmp_path / "fr", n_train=1, n_val=1, language="fr")
