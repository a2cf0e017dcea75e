"""Evaluation: the metric plumbing on hand-computed cases, attention correctness on
constructed attention maps whose answer is known, and the CLI end to end."""
from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from caption_eval import evaluate, gallery
from caption_eval.evaluators import attention, coco_metrics, exact_objects
from caption_io import geometry
from tests.conftest import headless_chromium

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W, H = 320, 240  # the scene set's image size: on InceptionV3's 8x8 grid, cells are 40 x 30 pixels
EIGHT = geometry.INCEPTION_V3.grid


# ------------------------------------------------------------------------------------ scoring
REFS = {11: ["A red circle in the top left."], 22: ["two shapes: a blue square and a green triangle"]}


def test_identical_caption_scores_one():
    # Two images, so CIDEr's document frequencies are not all equal (one image: idf 0).
    results = [{"image_id": 11, "caption": "a red circle in the top left"},
               {"image_id": 22, "caption": "Two shapes, a blue square and a green triangle."}]
    m = coco_metrics.score(results, REFS)
    assert m["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert m["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert m["ROUGE-L"] == pytest.approx(1.0)
    assert m["METEOR"] == pytest.approx(1.0, abs=1e-3)
    assert m["CIDEr"] > 0
    assert m["n_images"] == 2 and m["n_empty_captions"] == 0


def test_a_kept_meteor_process_scores_again_and_again_and_survives_its_death():
    results = [{"image_id": 11, "caption": "a red circle in the top left"},
               {"image_id": 22, "caption": "a blue square and a red triangle"}]
    with coco_metrics.Meteor() as meteor:
        first = coco_metrics.score(results, REFS, meteor=meteor)
        process = meteor._scorer.meteor_p
        assert coco_metrics.score(results, REFS, meteor=meteor) == first  # the same process, scoring again
        assert meteor._scorer.meteor_p is process
        process.kill()  # killed for memory, say: a fresh one is started, once, and scores the same
        assert coco_metrics.score(results, REFS, meteor=meteor) == first
        assert meteor._scorer.meteor_p is not process
    assert meteor._scorer is None  # the with-block ended it


@pytest.mark.parametrize("results, words", [
    ([{"image_id": 11, "caption": "a red circle"}], ["missing", "22"]),
    ([{"image_id": 11, "caption": "a"}, {"image_id": 22, "caption": "b"}, {"image_id": 99, "caption": "c"}],
     ["extra", "99"]),
    ([{"image_id": 11, "caption": "a"}, {"image_id": 22, "caption": "b"}, {"image_id": 11, "caption": "c"}],
     ["duplicate", "11"]),
])
def test_mismatched_results_are_refused(results, words):
    with pytest.raises(ValueError) as e:
        coco_metrics.score(results, REFS)
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message


def test_many_bad_ids_are_named_a_few_at_a_time():
    refs = {i: ["a caption"] for i in range(100)}
    with pytest.raises(ValueError, match=r"missing 97 image id\(s\).*: 3, 4, 5, 6, 7, \.\.\. \(97 in all\)"):
        coco_metrics.check_results([{"image_id": i, "caption": "a caption"} for i in range(3)], refs)


def test_malformed_result_entry_is_refused():
    with pytest.raises(ValueError, match=r"results\[1\]"):
        coco_metrics.check_results([{"image_id": 11, "caption": "a"}, {"image_id": 22}], REFS)


# ----------------------------------------------------------------------- attention correctness
def test_box_covering_four_cells():
    cover = attention.cell_coverage([40, 30, 80, 60], W, H, EIGHT)  # columns 1-2, rows 1-2
    assert cover.sum() == pytest.approx(4.0)
    assert sorted(np.flatnonzero(cover)) == [9, 10, 17, 18]  # row-major: row * 8 + column
    assert cover.sum() / 64 == pytest.approx(4 / 64)


def test_grid_is_row_major_rows_down_the_image():
    # Two cells side by side on row 1: x picks the column, y the row.
    assert list(np.flatnonzero(attention.cell_coverage([40, 30, 80, 30], W, H, EIGHT))) == [9, 10]


@pytest.mark.parametrize("name", ["inception_v3", "convnext_tiny"])  # an 8x8 grid and a 7x7 one
def test_cells_match_the_encoders_feature_map(name):
    """The convention cell_coverage assumes, checked on the encoder itself: a patch over the
    top-right 2x2 cells changes the features of those cells most."""
    import tensorflow as tf

    from model import backbones

    backbone = backbones.get(name)
    grid = backbone.geometry.grid
    width, height = 40 * grid[1], 30 * grid[0]  # cells of 40 x 30 pixels
    plain = np.full((height, width, 3), 128, np.uint8)
    patched = plain.copy()
    patched[0:60, width - 80:width] = 255  # box [width - 80, 0, 80, 60]: rows 0-1, the last two columns
    feats = backbone.build("random", 0)(backbone.prepare(tf.constant(np.stack([plain, patched]))),
                                        training=False).numpy()
    change = np.linalg.norm(feats[1] - feats[0], axis=1)
    cover = attention.cell_coverage([width - 80, 0, 80, 60], width, height, grid)
    assert set(np.argsort(change)[-4:]) == set(np.flatnonzero(cover))


def test_partial_cells_count_by_area():
    # Half a cell wide, one cell high: half of one cell; the aspect is not kept (320x240).
    cover = attention.cell_coverage([0, 0, 20, 30], W, H, EIGHT)
    assert cover[0] == pytest.approx(0.5) and cover.sum() == pytest.approx(0.5)
    # A box past the image's edge counts only inside it.
    assert attention.cell_coverage([300, 210, 100, 100], W, H, EIGHT).sum() == pytest.approx(0.5)  # 20 x 30 px


@pytest.mark.parametrize("grid, width, height", [((7, 7), 350, 280), ((3, 5), 320, 240)])
def test_cell_coverage_on_other_grids(grid, width, height):
    rows, columns = grid
    cell_w, cell_h = width / columns, height / rows  # columns split the width, rows the height
    cover = attention.cell_coverage([2 * cell_w, 1 * cell_h, cell_w, cell_h], width, height, grid)
    exactly = np.zeros(rows * columns)
    exactly[1 * columns + 2] = 1.0  # cell (row 1, column 2), row-major
    np.testing.assert_allclose(cover, exactly, atol=1e-9)
    # The whole top row, and a box of 2.25 x 1.5 cells at an odd place: its area, in cells.
    top = attention.cell_coverage([0, 0, width, cell_h], width, height, grid)
    assert list(np.flatnonzero(top)) == list(range(columns)) and top.sum() == pytest.approx(columns)
    box = attention.cell_coverage([0.3 * cell_w, 0.5 * cell_h, 2.25 * cell_w, 1.5 * cell_h], width, height, grid)
    assert box.sum() == pytest.approx(2.25 * 1.5)


def test_attention_over_another_grid_is_refused_naming_both(tmp_path):
    inst = _instances(tmp_path, [("red", "circle", [40, 30, 80, 60])])
    seven = attention.AttentionCorrectness(inst, (7, 7))
    seven.add(_item(5, ["red", "circle"], np.full((2, 49), 1 / 49)))
    assert seven.summary()["ratio"] == pytest.approx(1.0) and "7x7 grid" in seven.summary()["cells"]
    with pytest.raises(ValueError, match=r"64 positions.*7x7"):
        seven.add(_item(5, ["red", "circle"], np.full((2, 64), 1 / 64)))


def _instances(tmp_path, objects, elsewhere=()):
    """Image 5 holds `objects`, image 6 `elsewhere` (words the file knows, not on image 5)."""
    cats = ["circle", "square", "triangle"]
    placed = [(5, *o) for o in objects] + [(6, *o) for o in elsewhere]
    data = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": W, "height": H} for i in (5, 6)],
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(cats)],
            "annotations": [{"id": k, "image_id": image, "category_id": cats.index(shape) + 1, "bbox": box,
                             "colour": colour, "size": "large", "area": 1.0}
                            for k, (image, colour, shape, box) in enumerate(placed)]}
    path = tmp_path / "instances_val2014.json"
    path.write_text(json.dumps(data))
    return attention.load_instances(str(path))


def _item(image_id, words, maps):
    """An item as caption_split yields it, cut to the keys AttentionCorrectness reads."""
    return {"image_id": image_id, "words": words, "attention": maps}


def test_attention_share_on_constructed_maps(tmp_path):
    inst = _instances(tmp_path, [("red", "circle", [40, 30, 80, 60]), ("blue", "square", [200, 120, 80, 90])])
    circle = attention.cell_coverage([40, 30, 80, 60], W, H, EIGHT)
    on_circle = circle / circle.sum()       # all weight on the circle's four cells
    uniform = np.full(64, 1 / 64)
    words = ["a", "red", "circle", "and", "a", "blue", "square"]
    maps = np.stack([uniform, on_circle, on_circle, uniform, uniform, uniform, uniform])
    ac = attention.AttentionCorrectness(inst, EIGHT)
    ac.add(_item(5, words, maps))
    square_chance = attention.cell_coverage([200, 120, 80, 90], W, H, EIGHT).sum() / 64
    assert ac.shares == pytest.approx([1.0, 1.0, square_chance, square_chance])
    assert ac.chances == pytest.approx([4 / 64, 4 / 64, square_chance, square_chance])
    s = ac.summary()
    assert s["words"] == 4
    assert s["ratio"] == pytest.approx(np.mean(ac.shares) / np.mean(ac.chances))


def test_uniform_attention_scores_chance(tmp_path):
    inst = _instances(tmp_path, [("green", "triangle", [13, 17, 91, 77])])
    ac = attention.AttentionCorrectness(inst, EIGHT)
    ac.add(_item(5, ["green", "triangle"], np.full((2, 64), 1 / 64)))
    s = ac.summary()
    assert s["share"] == pytest.approx(s["chance"]) and s["ratio"] == pytest.approx(1.0)


def test_which_objects_a_word_names(tmp_path):
    inst = _instances(tmp_path, [("red", "circle", [0, 0, 50, 50]), ("red", "square", [200, 0, 50, 50])],
                      elsewhere=[("blue", "triangle", [0, 0, 50, 50])])
    objects, vocab = inst["images"][5]["objects"], inst["vocabulary"]
    # The phrase decides: the "red" of "red square" is the square, not the circle.
    assert attention.named_objects("a red circle and a red square".split(), objects, vocab) == \
        [None, [0], [0], None, None, [1], [1]]
    # "red" alone names both: ambiguous. A colour the image lacks names nothing; then
    # the shape word, not fitting the phrase either, names its own objects.
    assert attention.named_objects("two red shapes".split(), objects, vocab) == [None, [0, 1], None]
    assert attention.named_objects("a blue circle".split(), objects, vocab)[1:] == [[], [0]]
    ac = attention.AttentionCorrectness(inst, EIGHT)
    ac.add(_item(5, "two red shapes a blue circle".split(), np.full((6, 64), 1 / 64)))
    ac.add(_item(6, ["a", "red", "square"], np.full((3, 64), 1 / 64)))  # image 6 has neither: 2 more skipped
    assert ac.summary()["skipped"] == {"words_naming_several_objects": 1, "words_naming_no_object": 3}
    assert ac.summary()["words"] == 1  # "circle": the only circle


def test_which_objects_a_chinese_character_names(tmp_path):
    """Chinese comes a character a word: the characters of a colour or shape name name its
    objects, the "色" and "形" all of them end with (and the "三" of "three") only inside one."""
    inst = _instances(tmp_path, [("red", "circle", [0, 0, 50, 50]), ("red", "square", [200, 0, 50, 50]),
                                 ("blue", "triangle", [0, 120, 50, 50])])
    objects, vocab = inst["images"][5]["objects"], inst["vocabulary"]
    assert {"红色", "红", "圆形"} <= objects[0]["words"] and {"正方形", "三角形"} <= vocab

    def named(caption):
        return attention.named_objects(list(caption), objects, vocab)

    # 一 个 红 色 的 圆 形 和 红 色 正 方 形: the phrase decides across the 的, as in English.
    assert named("一个红色的圆形和红色正方形") == [None, None, [0], [0], None, [0], [0], None, [1], [1], [1], [1], [1]]
    assert named("红圆形在左上方") == [[0], [0], [0], None, None, None, None]  # "方" of a place: nothing
    assert named("有三个图形") == [None] * 5
    assert named("红色的东西") == [[0, 1], [0, 1], None, None, None]  # both red shapes: ambiguous
    assert named("一个蓝色的圆形")[2:] == [[2], [2], None, [0], [0]]  # no blue circle: each name alone
    ac = attention.AttentionCorrectness(inst, EIGHT)
    ac.add(_item(5, list("有三个图形：红色的东西和蓝色三角形"), np.full((17, 64), 1 / 64)))
    assert ac.summary()["words"] == 5 and ac.summary()["skipped"] == {"words_naming_several_objects": 2}


def test_exact_objects_reads_chinese_captions(tmp_path):
    inst = _instances(tmp_path, [("red", "circle", [0, 0, 50, 50]), ("blue", "square", [200, 0, 50, 50])])
    ex = exact_objects.ExactObjects(inst)
    for caption in ("一个红色的圆形和一个蓝色的正方形", "红 色 圆 形 和 蓝 色 正 方 形",
                    "一个红色的圆形和一个蓝色的圆形"):
        ex.add({"image_id": 5, "caption": caption})
    assert ex.summary()["2"] == {"images": 3, "exact": 2, "share": 2 / 3}


def test_exact_objects_by_scene_size(tmp_path):
    inst = _instances(tmp_path, [("red", "circle", [0, 0, 50, 50]), ("blue", "square", [200, 0, 50, 50])])
    ex = exact_objects.ExactObjects(inst)
    ex.add({"image_id": 5, "caption": "a red circle and a blue square"})
    ex.add({"image_id": 5, "caption": "a red circle and a blue circle"})
    assert ex.summary()["2"] == {"images": 2, "exact": 1, "share": 0.5}
    assert ex.summary()["all"]["share"] == 0.5


# --------------------------------------------------------------------------------- the gallery
def test_the_gallery_shows_the_worst_half_and_then_the_split_in_order():
    items = [{"image_id": i} for i in (10, 11, 12, 13, 14, 15, 16)]
    cider = {10: 2.0, 11: 0.1, 12: 3.0, 13: 0.5, 14: 0.1, 15: 1.0}  # 16: not scored, last
    assert [i["image_id"] for i in gallery.choose(items, cider, 4)] == [10, 11, 12, 14]  # worst: 11, 14
    assert [i["image_id"] for i in gallery.choose(items, cider, 5)] == [10, 11, 12, 13, 14]  # worst: + 13
    assert [i["image_id"] for i in gallery.choose(items, cider, 3)] == [10, 11, 14]
    assert gallery.choose(items, cider, 0) == [] and len(gallery.choose(items, cider, 99)) == 7


def test_gallery_without_images_still_lists_captions(tmp_path):
    item = {"image_id": 7, "file_name": "COCO_val2014_000000000007.jpg", "caption": "a red <circle>",
            "references": ["a red circle"], "words": ["a", "red", "circle"], "attention": np.full((3, 15), 1 / 15)}
    # The plot is drawn over the data's grid, here a non-square one of 3 rows and 5 columns.
    index = gallery.write(str(tmp_path / "g"), [item], [str(tmp_path / "nowhere")], (3, 5), {7: (W, H)})
    page = open(index).read()
    assert "not found" in page and "a red &lt;circle&gt;" in page and "a red circle" in page
    assert os.path.exists(tmp_path / "g" / "7-attention.png")


HOSTILE = "a </script><b>x</b> circle"
# (image_id, caption, cider, novel_pair, objects_right, colour or None: its image is missing)
GALLERY = [(1, "a red circle", 2.5, True, True, (220, 30, 30)),
           (2, "a blue square and a green triangle", 0.1, False, False, (30, 30, 220)),
           (3, HOSTILE, 1.0, True, False, (30, 200, 30)),
           (4, "", 0.0, False, False, (200, 200, 30)),
           (5, "a green square", None, None, None, None),
           (6, "two red circles", 0.5, None, True, (120, 30, 120))]


@pytest.fixture(scope="module")
def gallery_page(tmp_path_factory):
    """A gallery of hand-made items (no model): (its folder, the items)."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("gallery")
    (tmp / "images").mkdir()
    rng = np.random.default_rng(0)
    items = []
    for image_id, caption, cider, novel, right, colour in GALLERY:
        name = f"scene_{image_id}.jpg"
        if colour:
            Image.new("RGB", (W, H), colour).save(tmp / "images" / name)
        words = caption.split()
        items.append({"image_id": image_id, "file_name": name, "caption": caption, "words": words,
                      "references": [f"reference {image_id} <one>", f"reference {image_id} two"],
                      "attention": rng.dirichlet(np.ones(64), size=len(words)) if words else np.zeros((0, 64)),
                      "cider": cider, "novel_pair": novel, "objects_right": right})
    out = tmp / "g"
    gallery.write(str(out), items, [str(tmp / "images")], EIGHT, {5: (W, H)}, summary="CIDEr  0.820")
    return out, items


def test_gallery_folder_is_self_contained(gallery_page):
    from PIL import Image

    out, _ = gallery_page
    page = (out / "index.html").read_text()
    links = re.findall(r'\b(?:src|href)="([^"]*)"', page)
    assert {"1.jpg", "1-thumb.jpg", "1-attention.png", "5-attention.png"} <= set(links)
    for link in links:  # a file beside the page: no scheme, no absolute path
        assert ":" not in link and not link.startswith(("/", "//")) and (out / link).is_file(), link
    assert not re.search(r"https?://", page)
    for image_id in (1, 2, 3, 4, 6):
        assert Image.open(out / f"{image_id}-thumb.jpg").size == (gallery.THUMB_SIDE, gallery.THUMB_SIDE * H // W)
        assert Image.open(out / f"{image_id}.jpg").size == (W, H)
    # The missing image: no picture, its note, its attention on a blank canvas of its size.
    assert not (out / "5.jpg").exists() and not (out / "5-thumb.jpg").exists()
    assert "image scene_5.jpg not found" in page and "6 images, 5 found on disk." in page
    assert Image.open(out / "5-attention.png").size[0] > 0
    # The empty caption: said, and no attention figure.
    assert "(empty)" in page and not (out / "4-attention.png").exists() and "no attention to plot" in page
    # The hostile caption cannot close the data's <script>, nor add markup.
    assert page.count("</script>") == 2 and "<b>x</b>" not in page
    assert html.escape(HOSTILE) in page and "reference 1 &lt;one&gt;" in page
    assert "<pre id=\"summary\">CIDEr  0.820</pre>" in page


CARDS_JS = """
return Array.from(document.querySelectorAll("#grid .card"))
  .filter(card => !card.hidden).map(card => Number(card.dataset.i));
"""
LINKS_JS = """
const all = [...document.querySelectorAll("*")];
for (const t of document.querySelectorAll("template")) all.push(...t.content.querySelectorAll("*"));
return all.flatMap(el => Array.from(el.attributes, a => a.value)).filter(v => /https?:/i.test(v));
"""


def test_gallery_in_chromium_sorts_filters_and_opens_a_card(gallery_page, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    out, items = gallery_page
    ids = [item["image_id"] for item in items]
    browser = headless_chromium(tmp_path)
    try:
        browser.get((out / "index.html").as_uri())
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        shown = lambda: [ids[i] for i in browser.execute_script(CARDS_JS)]
        count = lambda: browser.find_element(By.ID, "count").text
        assert shown() == [4, 2, 6, 3, 1, 5] and count() == "6 of 6 images shown"  # worst first, unknown last
        cider = browser.find_element(By.CSS_SELECTOR, '.card[data-i="4"] .cider').text  # image 5's
        assert cider == "–"
        sort, show = Select(browser.find_element(By.ID, "sort")), Select(browser.find_element(By.ID, "filter"))
        sort.select_by_value("best")
        assert shown() == [1, 3, 6, 2, 4, 5]
        sort.select_by_value("split")
        assert shown() == ids
        sort.select_by_value("worst")
        show.select_by_value("novel")
        assert shown() == [3, 1] and count() == "2 of 6 images shown"
        show.select_by_value("wrong")
        assert shown() == [4, 2, 3] and count() == "3 of 6 images shown"
        show.select_by_value("all")
        browser.find_element(By.ID, "search").send_keys("SQUARE")
        assert shown() == [2, 5] and count() == "2 of 6 images shown"
        browser.find_element(By.ID, "search").send_keys(Keys.BACKSPACE * len("SQUARE"))  # typed away
        assert count() == "6 of 6 images shown"

        # The hostile caption shows as text, on its card and in its detail.
        card = lambda image_id: browser.find_element(By.CSS_SELECTOR, f'.card[data-i="{ids.index(image_id)}"] button')
        assert card(3).find_element(By.CLASS_NAME, "caption").text == HOSTILE
        assert card(3).find_elements(By.TAG_NAME, "b") == [card(3).find_element(By.CLASS_NAME, "cider")]

        dialog = browser.find_element(By.ID, "detail")
        card(2).click()
        assert dialog.get_attribute("open") is not None
        refs = [li.text for li in dialog.find_elements(By.CSS_SELECTOR, ".refs li")]
        assert refs == ["reference 2 <one>", "reference 2 two"]
        assert dialog.find_element(By.CLASS_NAME, "gen").text == items[1]["caption"]
        loaded = 'const img = document.querySelector("#detail .attention"); return img.complete && img.naturalWidth'
        WebDriverWait(browser, 5).until(lambda b: b.execute_script(loaded))
        ActionChains(browser).send_keys(Keys.ESCAPE).perform()
        WebDriverWait(browser, 5).until(lambda b: dialog.get_attribute("open") is None)
        assert browser.switch_to.active_element == card(2)  # back on the card it opened

        # From the keyboard: the hostile one, with Enter; the next card with the right arrow; Escape.
        card(3).send_keys(Keys.ENTER)
        assert dialog.get_attribute("open") is not None
        assert dialog.find_element(By.CLASS_NAME, "gen").text == HOSTILE
        ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()  # worst first: 3 then 1
        assert dialog.find_element(By.CLASS_NAME, "gen").text == "a red circle"
        ActionChains(browser).send_keys(Keys.ESCAPE).perform()
        WebDriverWait(browser, 5).until(lambda b: dialog.get_attribute("open") is None)
        # The empty caption's and the missing image's details say so.
        card(4).click()
        assert "(empty)" in dialog.text and "no attention to plot" in dialog.text
        assert dialog.find_elements(By.CLASS_NAME, "attention") == []
        browser.find_element(By.ID, "close").click()
        card(5).click()
        assert "not found" in dialog.text and dialog.find_elements(By.CLASS_NAME, "photo") == []
        browser.find_element(By.ID, "close").click()

        assert browser.execute_script(LINKS_JS) == []
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []

        # Items without the optional keys: those filters are disabled, and nothing breaks.
        plain = [{k: item[k] for k in ("image_id", "file_name", "caption", "references", "words", "attention")}
                 for item in items]
        index = gallery.write(str(tmp_path / "plain"), plain, [str(out.parent / "images")], EIGHT, {5: (W, H)})
        browser.get(f"file://{index}")
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        assert shown() == ids and count() == "6 of 6 images shown"  # no CIDEr: split order
        options = Select(browser.find_element(By.ID, "filter")).options
        assert [o.get_attribute("value") for o in options if not o.is_enabled()] == ["novel", "wrong"]
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        browser.quit()


# ------------------------------------------------------------------------------------- the CLI
def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "caption_eval.evaluate", *args], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def evaluated(trained_job, small_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval"))
    proc = run_cli("--model", os.path.join(trained_job, "export"), "--data", small_data, "--output", out,
                   "--gallery", "3", "--beam-size", "2", "--no-repeat-ngram", "1", "--min-length", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_cli_writes_results_metrics_and_gallery(evaluated, small_data):
    from caption_io import metadata, records

    out, proc = evaluated
    val_ids = sorted(r["image_id"] for r in records.read_records(metadata.shard_files(small_data, "val")))
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert sorted(r["image_id"] for r in results) == val_ids  # every val image, once
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in results)
    # The decoding flags reached the captions scored: no word twice, none shorter than 3 words.
    words = [r["caption"].split() for r in results]
    assert all(len(set(w)) == len(w) and len(w) >= 3 for w in words), words

    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    for key in coco_metrics.METRIC_KEYS:
        assert 0.0 <= metrics[key] <= 10.0, key
    assert metrics["n_images"] == len(val_ids) and metrics["beam_size"] == 2
    assert metrics["decoding"] == {"no_repeat_ngram": 1, "min_length": 3}
    # The scene set writes boxes, so both object figures are there.
    att = metrics["attention_correctness"]
    assert att["chance"] is None or 0 < att["chance"] < 1
    assert metrics["exact_objects"]["all"]["images"] == len(val_ids)

    page = open(os.path.join(out, "gallery", "index.html")).read()
    sources = re.findall(r'src="([^"]+)"', page)
    assert any(s.endswith(".png") for s in sources)
    for s in sources:
        assert os.path.exists(os.path.join(out, "gallery", s)), s
    assert "not found" not in page  # the images were found from metadata.json's source
    assert "BLEU-4" in proc.stdout  # the table


@pytest.mark.parametrize("args, flag", [(["--split", "train"], "--split"), (["--no-repeat-ngram", "-1"],
                                                                             "--no-repeat-ngram")])
def test_bad_flag_is_one_line(args, flag, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", "x", *args])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err


def test_missing_model_is_one_line(tmp_path, capsys):
    assert evaluate.main(["--model", str(tmp_path / "no-such-export")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such directory" in err

