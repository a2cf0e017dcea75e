"""Attention plots' titles in Chinese and Japanese: drawn with a CJK font when one is installed,
one warning naming the package to install when none is, and long titles kept to their panels."""
from __future__ import annotations

import warnings

import matplotlib.figure
import numpy as np
import pytest
from matplotlib import font_manager

from caption_serving import plot

BLACK = np.zeros((60, 80, 3), np.uint8)
CHINESE = ["红", "色", "圆"]


def draw(words):
    """attention_png's bytes and every warning it gave, none filtered out or deduplicated."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        png = plot.attention_png(BLACK, words, np.full((len(words), 49), 1 / 49))
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return png, [str(w.message) for w in caught]


def missing_glyphs(messages):
    """matplotlib's reports of glyphs no font had: "Glyph 32418 (…) missing from font(s) DejaVu Sans."."""
    return [m for m in messages if "missing from font" in m]


@pytest.fixture(autouse=True)
def fresh_lookup():
    """Each test decides the font (and warns) afresh, and leaves no decision behind."""
    plot.cjk_family.cache_clear()
    plot._warn_no_cjk_font.cache_clear()
    yield
    plot.cjk_family.cache_clear()
    plot._warn_no_cjk_font.cache_clear()


@pytest.fixture
def cjk_family():
    family = plot.cjk_family()
    if family is None:
        pytest.skip("no font with CJK glyphs installed (`make fonts` installs fonts-wqy-microhei)")
    return family


def test_chinese_titles_draw_without_missing_glyphs(cjk_family, monkeypatch):
    _, messages = draw(CHINESE)
    assert missing_glyphs(messages) == [] and messages == []
    # The control: the same titles in matplotlib's default font are reported glyph by glyph, so
    # the check above would catch a plot that did not choose the CJK font.
    monkeypatch.setattr(plot, "title_font", lambda words: {})
    _, messages = draw(CHINESE)
    assert {m.split()[1] for m in missing_glyphs(messages)} == {str(ord(c)) for c in CHINESE}, messages


def test_a_font_installed_after_matplotlibs_font_list_was_built_is_found(cjk_family, monkeypatch):
    manager = font_manager.fontManager
    path = manager.findfont(font_manager.FontProperties(family=cjk_family), fallback_to_default=False)
    stale = [f for f in manager.ttflist if f.fname != path]  # as cached before the font was installed
    monkeypatch.setattr(manager, "ttflist", stale)
    manager._findfont_cached.cache_clear()  # nor remembers finding it (addfont clears it again)
    plot.cjk_family.cache_clear()
    family = plot.cjk_family()
    assert family is not None
    # Registered: the name a title gives resolves to a font file with the glyphs.
    found = manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
    assert found == path


def test_without_a_cjk_font_one_warning_names_the_package(monkeypatch):
    monkeypatch.setattr(plot, "cjk_family", lambda: None)
    _, first = draw(CHINESE)
    _, second = draw(["圆"])
    assert len(first) == 1 and "fonts-wqy-microhei" in first[0] and "make fonts" in first[0], first
    assert second == []  # once a process; and no line per missing glyph after it

    # Words without CJK characters neither look for a font nor warn.
    monkeypatch.setattr(plot, "cjk_family", lambda: pytest.fail("looked for a CJK font"))
    assert draw(["a", "red", "ball"])[1] == []


def test_long_titles_are_kept_to_their_panels(monkeypatch):
    drawn, save = [], matplotlib.figure.Figure.savefig

    def measure_and_save(fig, *args, **kwargs):
        """Each panel's (title, title's width, panel's width) in pixels, as the PNG has them."""
        renderer = fig.canvas.get_renderer()
        drawn.extend((ax.title.get_text(), ax.title.get_window_extent(renderer).width,
                      ax.get_window_extent(renderer).width) for ax in fig.axes if ax.images)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", measure_and_save)
    words = ["a", "x" * 60, "ball", "internationalisation"]
    if plot.cjk_family() is not None:
        words.append("中华人民共和国国家统计局发布了数据")
    draw(words)
    titles = [title for title, _, _ in drawn]
    assert titles[0] == "a" and titles[2] == "ball" and titles[3] == words[3]  # titles that fit are kept
    assert titles[1].endswith("…") and titles[1][:-1] == "x" * (len(titles[1]) - 1)
    for title, width, panel in drawn:
        assert width <= panel, (title, width, panel)
