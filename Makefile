# One entry point for people and CI. `make test`, `make demo` and `make up` set everything up themselves.
VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.setup-stamp
SHARE     := $(VENV)/share/dreambooth
CLIP_BPE  := $(SHARE)/bpe_simple_vocab_16e6.txt.gz
OPEN_CLIP := open_clip_torch==3.3.0
BUF       := npx -y @bufbuild/buf@1.75.0

.PHONY: setup tools test test-slow lint proto demo up bench pretrain-base clean-venv

setup: $(STAMP)

# Re-runs when the package definitions change; idempotent otherwise.
$(STAMP): pyproject.toml clients/python/pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU wheel on these machines (a GPU machine gets the CUDA build of the same version).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e clients/python -e '.[dev]'
	# The real CLIP BPE vocabulary ships inside the open_clip wheel; take the file, not the package.
	mkdir -p $(SHARE)
	test -s $(CLIP_BPE) || ( $(PY) -m pip download -q --no-deps --only-binary=:all: $(OPEN_CLIP) -d $(SHARE)/wheels \
	  && $(PY) -c "import glob,zipfile,sys; z=zipfile.ZipFile(glob.glob('$(SHARE)/wheels/open_clip_torch-*.whl')[0]); open('$(CLIP_BPE)','wb').write(z.read('open_clip/bpe_simple_vocab_16e6.txt.gz'))" )
	touch $(STAMP)

# Optional system tools some checks use (promtool from Debian's prometheus package). Needs root and
# apt-get; without them those checks are skipped with a reason.
tools:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
	  || echo "promtool not installed: metric and rule checks will be skipped"

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(BUF) lint

proto: setup
	$(PY) tools/gen_protos.py

demo: setup
	$(PY) -m demo

# The three services on this machine (store under ./data, local Ray); Ctrl-C stops them.
up: setup
	$(PY) -m services.cli up

# The toy-world base model (DESIGN §6, issue 9): draws the world, trains the VAE, then UNet + text
# encoder; about an hour on 2 cores. Its pretrain_manifest.json records the command, seed, threads,
# settings and versions: the same ones on the same machine give the same bytes (unless --minutes
# stopped a stage early on a slower machine; the manifest then says so).
pretrain-base: setup
	$(PY) -m services.cli pretrain-base --out models/toy-world-base --seed 0 --threads 2 --minutes 60 --overwrite

bench: setup
	$(PY) bench/inference.py
	$(PY) bench/priorgen.py
	$(PY) bench/train.py
	$(PY) bench/lora.py

clean-venv:
	rm -rf $(VENV)
