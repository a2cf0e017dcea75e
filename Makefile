# Two commands do all the set-up on a fresh machine:
#   make demo   scene set -> Beam pipeline -> (trainer, export, caption: as they land)
#   make test   the whole test suite (CI runs exactly this)
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEMO    ?= demo_out

.PHONY: demo test lint java cxx chromium fonts clean

# The venv is rebuilt when setup.py changes (its dependencies are declared there).
$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The COCO caption metrics (pycocoevalcap) run Java; install it where missing.
java:
	@command -v java >/dev/null 2>&1 || { \
	  echo "installing Java for the COCO caption metrics (default-jre-headless)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null; }

# Training on CPU builds its fused attention kernels (model/kernels/) with a C++ compiler on
# first use; without one it runs TensorFlow ops instead, slower. Install g++ where missing.
cxx:
	@command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 || { \
	  echo "installing g++ for the fused attention kernels"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null \
	  || echo "could not install g++: CPU training will use TensorFlow ops (slower)"; }

# caption-serve's page is tested in a real browser: headless Chromium driven through its driver
# (selenium). Install Debian's chromium and chromium-driver where missing; without them that
# test is skipped and says why.
chromium:
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || { \
	  echo "installing Chromium and its driver for the caption-serve page test (chromium chromium-driver)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
	  || echo "could not install chromium: the browser test will be skipped"; }

# Attention plots title each panel with its word, and matplotlib's default font (DejaVu Sans) has
# no Chinese or Japanese glyphs. Install WenQuanYi Micro Hei where fontconfig knows no Chinese font:
# Chinese, Japanese kana and Korean in one 1.6 MB package (fonts-noto-cjk is 57 MB).
fonts:
	@fc-list :lang=zh 2>/dev/null | grep -q . || test -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc || { \
	  echo "installing a Chinese/Japanese font for attention plots' titles (fonts-wqy-microhei)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-wqy-microhei >/dev/null \
	  || echo "could not install fonts-wqy-microhei: Chinese and Japanese titles in attention plots draw as boxes"; }

# The linter first (settings in pyproject.toml), then the docs site built strictly (a broken link or
# a page missing from mkdocs.yml fails), into a scratch folder: a finding fails the run before the tests.
lint: $(STAMP)
	$(PY) -m ruff check .
	@site=$$(mktemp -d); NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir "$$site"; status=$$?; rm -rf "$$site"; exit $$status

# --durations: the slowest tests in every run's log, for keeping the suite within its time budget.
# -n auto: one pytest worker a core (pytest-xdist); alone, the suite kept about one of two cores busy
# (subprocess start-ups, Java, Beam's runner). --dist loadfile: a file's tests run in one worker, so
# a module's fixtures are made once. --no-loadscope-reorder: files go out in the order tests/conftest.py
# puts them in (the longest first), not by how many tests each holds.
test: lint java cxx chromium fonts
	$(PY) -m pytest -q -rs --durations=25 -n auto --dist loadfile --no-loadscope-reorder

demo: $(STAMP) java cxx fonts
	bash scripts/demo.sh $(DEMO)

clean:
	rm -rf $(DEMO) .pytest_cache
