"""What is shipped: the installed distribution and both container images hold every package."""
from __future__ import annotations

import os
import re

import setuptools  # noqa: F401 - provides distutils where Python no longer does

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("caption_io", "model", "caption_serving", "pipelines", "caption_eval", "trainer")


def test_setup_ships_every_top_level_package():
    from distutils.core import run_setup

    here = os.getcwd()
    os.chdir(ROOT)
    try:
        dist = run_setup("setup.py", stop_after="init")
    finally:
        os.chdir(here)
    assert {p.split(".")[0] for p in dist.packages} == set(PACKAGES)
    assert "pipelines.transforms" in dist.packages and "caption_eval.evaluators" in dist.packages
    here = {d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py"))}
    assert here - {"benchmarks", "tests"} == set(PACKAGES), "a new package must be listed in setup.py and here"


def test_both_images_copy_every_package():
    for dockerfile in ("Dockerfile", "docker/trainer.Dockerfile"):
        text = open(os.path.join(ROOT, dockerfile)).read()
        copied = set(re.findall(r"^COPY (\w+) \./\1$", text, flags=re.M))
        assert copied == set(PACKAGES), (dockerfile, set(PACKAGES) - copied)
