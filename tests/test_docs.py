"""The documentation against the code: the training flags table in docs/training.md is the one
scripts/flags_table.py makes from trainer/settings.py, the README's links reach their pages, and
the mkdocs site builds without a warning. No model is built: these take seconds."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINING_PAGE = ROOT / "docs" / "training.md"


def _flags_table():
    spec = importlib.util.spec_from_file_location("flags_table", ROOT / "scripts" / "flags_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def flags_table():
    return _flags_table()


def test_training_page_flags_match_settings(flags_table):
    page = TRAINING_PAGE.read_text(encoding="utf-8")
    assert flags_table.table_in(page) == flags_table.render(), (
        "docs/training.md's flags table differs from trainer/settings.py: "
        "run python scripts/flags_table.py --write docs/training.md")


def test_table_has_every_flag_of_the_command(flags_table):
    """Every flag trainer.task accepts (the parser add_flags builds) is in the table, once."""
    import argparse

    from trainer import settings

    parser = argparse.ArgumentParser(add_help=False)
    settings.add_flags(parser)
    table = flags_table.render()
    flags = [name for action in parser._actions for name in action.option_strings]
    assert flags
    for name in flags:
        assert len(re.findall(rf"`{re.escape(name)}`", table)) == 1, name
    # one header, one rule, one row per setting
    assert len(table.strip().splitlines()) == 2 + len(settings.Settings.__dataclass_fields__)


def test_write_replaces_only_the_table(flags_table, tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"before\n\n{flags_table.BEGIN}\n| stale |\n{flags_table.END}\n\nafter\n", encoding="utf-8")
    assert flags_table.main(["--check", str(page)]) == 1
    assert flags_table.main(["--write", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    assert text.startswith("before\n\n") and text.endswith(f"{flags_table.END}\n\nafter\n")
    assert flags_table.table_in(text) == flags_table.render()
    assert flags_table.main(["--check", str(page)]) == 0


def test_readme_keeps_the_commands_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    for command in ("make demo", "make test", ".ci/run", "--help"):
        assert command in readme, command
    targets = re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]+)?\)", readme)
    assert targets
    for target in targets:
        assert (ROOT / target).is_file(), target


def test_no_tracker_wording_in_the_docs():
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        hits = re.findall(r"(?i)issue [0-9]+|wa[v]e", page.read_text(encoding="utf-8"))
        assert not hits, f"{page.relative_to(ROOT)}: {hits}"


def test_mkdocs_site_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed (pip install -e .[test])")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "WARNING" not in out.stderr, out.stderr[-3000:]
