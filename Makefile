# The two commands a researcher needs (each sets up whatever is missing first):
#   make test    run the test suite
#   make book    execute every chapter on miniature models and build the HTML site (_build/html)
# Options: make book PROFILE=paper   (the papers' models by hub id; needs a GPU and the data)
#          make chapter NAME=01_layer_sweep ARGS="-p lam 5"   (rerun one chapter)
#          make publish   (pack the built site into _build/saekit-site.tar.gz for any static host)
#          make lint      (ruff, mypy, actionlint; as .pre-commit-config.yaml)
#          make rehearse   (every chapter on the paper code path, offline on a CPU, against
#                           miniatures of the papers' checkpoints; pages in build/rehearsal)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROFILE ?= mini
# torch comes first and is the user's to choose: CI and `make` take this CPU build.
TORCH ?= 2.13.0
NPM_ASSETS := @jupyter-widgets/html-manager@1.0.15 requirejs@2.3.8 mathjax@3.2.2
WEB_ASSETS := book/_static/widgets/embed-amd.js book/_static/mathjax/tex-chtml.js

# Tiny models run far faster single-threaded; NLTK finds the WordNet laid out below.
export OMP_NUM_THREADS ?= 1
export NLTK_DATA := $(CURDIR)/nltk_data
export PYTHONHASHSEED := 0

.PHONY: setup test book chapter rehearse lint lock publish clean benchmarks chromium

setup: $(VENV)/.installed nltk_data/corpora/wordnet/lexnames

# torch first, from its CPU wheel: otherwise pip resolves torch from PyPI with gigabytes of CUDA.
# Then the exact versions CI tests (requirements/lock.txt), then saekit itself, resolving nothing.
$(VENV)/.installed: pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH)
	$(BIN)/pip install -q -r requirements/lock.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

nltk_data/corpora/wordnet/lexnames:
	bash scripts/setup_wordnet.sh nltk_data

# Widget JavaScript and MathJax are served from the site itself, so widgets and formulas
# render offline (Jupyter Book would otherwise load them from CDNs).
$(WEB_ASSETS):
	rm -rf build/npm && mkdir -p build/npm book/_static/widgets book/_static/mathjax
	cd build/npm && npm install --silent --no-audit --no-fund --prefix . $(NPM_ASSETS) >/dev/null
	cp build/npm/node_modules/requirejs/require.js book/_static/widgets/require.js
	cp -r build/npm/node_modules/@jupyter-widgets/html-manager/dist/. book/_static/widgets/
	cp -r build/npm/node_modules/mathjax/es5/. book/_static/mathjax/

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

book: setup $(WEB_ASSETS) chromium
	$(BIN)/saekit book --profile $(PROFILE)
	SAEKIT_SITE=_build/html $(BIN)/python -m pytest -q tests/site

# The site checks open every chapter in headless Chromium (Debian's package).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

chapter: setup
	$(BIN)/saekit book --profile $(PROFILE) --only $(NAME) --no-html $(ARGS)

# The paper profile rehearsed: hub-shaped miniatures of every checkpoint it names in a Hugging
# Face cache and toy-world ImageNet folders (saekit.mini.hub), then `saekit book --profile paper`
# offline with small epochs and counts (scripts/rehearse.py). ARGS="--only 02_ood" for one.
rehearse: setup
	$(BIN)/python scripts/rehearse.py --dir build/rehearsal $(ARGS)

# The same checks as .pre-commit-config.yaml: ruff, mypy on the core package (files in
# pyproject.toml), actionlint on the GitHub workflows.
lint: setup
	$(BIN)/ruff check saekit tests benchmarks scripts notebooks
	$(BIN)/mypy
	$(BIN)/actionlint

# Re-resolve requirements/lock.txt after changing pyproject.toml's ranges (pip-tools, in its own
# venv; torch held at the CPU build above, so the lock gets none of CUDA's packages).
lock:
	$(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/pip install -q pip-tools
	echo "torch==$(TORCH)" > build/torch-constraint.txt
	build/lock-venv/bin/pip-compile --quiet --extra all --unsafe-package torch --unsafe-package saekit \
	  --strip-extras --no-emit-index-url --no-emit-find-links -c build/torch-constraint.txt \
	  -o requirements/lock.txt pyproject.toml

# Pack the built site (`make book` first) for any static host: unpack it at the web root.
SITE_DIR ?= _build/html
SITE_TARBALL ?= _build/saekit-site.tar.gz
publish:
	@test -f $(SITE_DIR)/index.html || { echo "no site in $(SITE_DIR): run make book first" >&2; exit 1; }
	tar -czf $(SITE_TARBALL) -C $(SITE_DIR) .
	@echo "site packed into $(SITE_TARBALL): unpack it at your host's web root (tar -xzf)"

benchmarks: setup
	for b in benchmarks/*.py; do $(BIN)/python $$b --quick || exit 1; done

clean:
	rm -rf _build build runs
