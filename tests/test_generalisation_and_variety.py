"""The figures of caption quality beyond the COCO metrics, on hand-made cases whose answer is
known: each image's own CIDEr, scenes with a held-out (colour, shape) pair apart from the rest,
and caption variety."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from caption_eval import evaluate
from caption_eval.evaluators import attention, coco_metrics, novel_pairs, variety
from caption_io import scenes
from trainer import epoch_eval

W, H = 320, 240
CIRCLE, SQUARE, TRIANGLE = [0, 0, 80, 60], [120, 0, 80, 60], [240, 120, 80, 60]
# Image: (its objects, whether it holds the held-out pair (blue, triangle)).
SCENES = {1: ([("red", "circle", CIRCLE)], False),
          2: ([("blue", "triangle", TRIANGLE)], True),
          3: ([("red", "circle", CIRCLE), ("blue", "triangle", TRIANGLE)], True),
          4: ([("green", "square", SQUARE)], False)}


def _instances(tmp_path, held_out=(("blue", "triangle"),)):
    cats = list(scenes.SHAPES)
    annotations = [{"id": 10 * i + k, "image_id": i, "category_id": cats.index(shape) + 1, "bbox": box,
                    "colour": colour, "size": "large", "area": 1.0}
                   for i, (objs, _) in SCENES.items() for k, (colour, shape, box) in enumerate(objs)]
    images = [{"id": i, "file_name": f"{i}.jpg", "width": W, "height": H} for i in SCENES]
    info = {}
    if held_out:
        info["novel_pairs"] = [list(p) for p in held_out]
        for im in images:
            im["novel_pair"] = SCENES[im["id"]][1]
    data = {"info": info, "images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(cats)]}
    path = tmp_path / "instances_val2014.json"
    path.write_text(json.dumps(data))
    return attention.load_instances(str(path))


REFS = {1: ["a red circle in the top left", "a picture showing a red circle"],
        2: ["a blue triangle in the bottom right", "a picture showing a blue triangle"],
        3: ["a red circle and a blue triangle", "a picture showing a red circle and a blue triangle"],
        4: ["a green square in the top middle", "a picture showing a green square"]}
# Image 2's caption names the memorised pair instead of the new one; the others are right.
CAPTIONS = {1: "a red circle in the top left", 2: "a blue square in the bottom right",
            3: "a red circle and a blue triangle", 4: "a picture showing a green square"}


SEVEN = (7, 7)  # a ConvNeXt-Tiny or MobileNetV3 data directory's grid: the attention figures take it


def _item(image_id):
    words = CAPTIONS[image_id].split()
    return {"image_id": image_id, "file_name": f"{image_id}.jpg", "caption": CAPTIONS[image_id],
            "words": words, "references": REFS[image_id], "attention": np.full((len(words), 49), 1 / 49)}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The four images through the evaluation's own evaluators (one METEOR start): (metrics as
    metrics.json nests them, the CocoMetrics, the boxes)."""
    boxes = _instances(tmp_path_factory.mktemp("boxes"))
    coco = coco_metrics.CocoMetrics()
    nested = evaluate.split_evaluators(boxes, coco, SEVEN)
    for image_id in SCENES:
        for e in [coco] + [e for e in nested.values() if e]:
            e.add(_item(image_id))
    metrics = dict(coco.summary(), split="val", beam_size=1)
    metrics.update({key: e.summary() if e else None for key, e in nested.items()})
    return metrics, coco, boxes


def test_each_image_has_its_own_cider_and_the_split_figure_is_their_mean(evaluated):
    metrics, coco, _ = evaluated
    assert set(coco.image_cider) == set(SCENES)
    assert np.mean(list(coco.image_cider.values())) == pytest.approx(metrics["CIDEr"])
    # The wrong caption scores lowest; the exact copies of a reference highest.
    assert min(coco.image_cider, key=coco.image_cider.get) == 2


def test_novel_pair_scenes_are_scored_apart_from_the_rest(evaluated):
    metrics, coco, _ = evaluated
    novel = metrics["novel_pairs"]
    assert novel["pairs"] == [["blue", "triangle"]]
    assert novel["novel"]["images"] == 2 and novel["seen"]["images"] == 2
    assert novel["novel"]["exact_objects"] == 0.5 and novel["seen"]["exact_objects"] == 1.0
    assert novel["novel"]["CIDEr"] == pytest.approx((coco.image_cider[2] + coco.image_cider[3]) / 2)
    assert novel["seen"]["CIDEr"] == pytest.approx((coco.image_cider[1] + coco.image_cider[4]) / 2)
    assert novel["novel"]["attention_ratio"] == pytest.approx(1.0)  # uniform attention is chance
    assert metrics["exact_objects"]["all"]["share"] == 0.75
    text = evaluate.table(metrics)
    assert re.search(r"novel-pair scenes +exact objects 0\.500, CIDEr \d\.\d{3}, attention 1\.0x chance  "
                     r"\(2 images\)", text), text
    assert re.search(r"seen-pair scenes +exact objects 1\.000", text), text
    flat = epoch_eval.figures(metrics)
    assert flat["val_exact_objects_novel"] == 0.5 and flat["val_exact_objects_seen"] == 1.0


def test_without_held_out_pairs_there_is_no_novel_figure(tmp_path):
    boxes = _instances(tmp_path, held_out=())
    nested = evaluate.split_evaluators(boxes, coco_metrics.CocoMetrics(), SEVEN)
    assert nested["novel_pairs"] is None and nested["exact_objects"] is not None
    assert not any(k.startswith("val_exact_objects_") for k in epoch_eval.figures(
        {**{k: 0.0 for k in coco_metrics.METRIC_KEYS}, "n_images": 1, "novel_pairs": None}))


def test_variety_on_counted_captions():
    v = variety.Variety(scenes.POSITION_WORDS)
    for caption in ["a picture showing a red circle", "a picture showing a red circle",
                    "a picture showing a blue square", "there is a red circle on the left side of the picture",
                    "a blue square above a red circle"]:
        v.add({"words": caption.split()})
    s = v.summary()
    assert s["captions"] == 5 and s["distinct_captions"] == 4 / 5
    assert s["openings"] == 3 and s["top_openings"][0] == ["a picture", 3]
    assert s["vocabulary"] == len(set("a picture showing red circle blue square there is on the left side of above"
                                      .split()))
    assert s["mean_length"] == pytest.approx((6 + 6 + 6 + 12 + 7) / 5)
    assert s["says_where"] == 2 / 5
    assert "says_where" not in variety.Variety().summary() | {"captions": 0}
    chinese = variety.Variety()
    chinese.add({"words": list("一个红色的圆")})
    assert chinese.summary()["top_openings"] == [["一个", 1]]
    nowhere = variety.Variety()  # data that is not the scene set: no position words to count
    nowhere.add({"words": ["a", "dog"]})
    assert "says_where" not in nowhere.summary()


def test_chinese_captions_say_where_by_their_characters():
    v = variety.Variety(scenes.POSITION_WORDS)
    for caption in ["画面里有一个红色的圆形", "一个红色圆形，背景是灰色的", "有三个图形：红色的圆形和蓝色的正方形",
                    "左上方的红色圆形", "图片中间有一个红色的圆形", "一个小的红色圆形在大的蓝色三角形的上面"]:
        v.add({"words": [ch for ch in caption if ch not in "，：、"]})
    assert v.summary()["says_where"] == 3 / 6


def test_variety_reaches_the_table_and_the_epoch_record(evaluated):
    metrics, _, _ = evaluated
    v = metrics["variety"]
    assert v["distinct_captions"] == 1.0 and v["openings"] == 3 and v["says_where"] == 0.5
    assert re.search(r"distinct captions +1\.000  \(3 openings, 16 words used", evaluate.table(metrics))
    flat = epoch_eval.figures(metrics)
    assert flat["val_distinct_captions"] == 1.0 and flat["val_openings"] == 3 and flat["val_says_where"] == 0.5
    assert set(flat) - {"eval_images"} <= {f"val_{k}" for k in epoch_eval.CAPTION_FIGURES}


def test_gallery_items_carry_cider_novelty_and_whether_the_objects_are_right(evaluated):
    _, coco, boxes = evaluated
    items = {i["image_id"]: i for i in evaluate.annotate([_item(i) for i in SCENES], coco, boxes)}
    assert [items[i]["novel_pair"] for i in SCENES] == [False, True, True, False]
    assert [items[i]["objects_right"] for i in SCENES] == [True, False, True, True]
    assert items[2]["cider"] == coco.image_cider[2]
    bare = evaluate.annotate([_item(1)], coco, None)[0]  # no boxes: nothing known but the CIDEr
    assert bare["novel_pair"] is None and bare["objects_right"] is None and bare["cider"] == coco.image_cider[1]
    assert novel_pairs.group(boxes, 99) is None


def test_the_benchmark_reads_the_evaluations_figures(evaluated):
    from benchmarks import generalisation

    metrics, _, _ = evaluated
    f = generalisation.figures(dict(metrics, model="JOB/export"))
    assert (f["exact_novel"], f["exact_seen"], f["openings"], f["novel_pairs"]) == (0.5, 1.0, 3, [["blue", "triangle"]])
    assert generalisation._variant("wd=--word-dropout 0.3") == ("wd", ["--word-dropout", "0.3"])
    with pytest.raises(SystemExit):
        generalisation.figures(dict(metrics, model="JOB/export", novel_pairs=None))
