# Everything installs itself: a fresh machine needs only python3 (3.11) and pip.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fvae-installed

.PHONY: venv test demo demo-smoke debian-data lab notebooks-sync bench bench-step bench-loader bench-gpu bench-data bench-eval tiny small clean

venv: $(STAMP)

# Re-install only when the pins or the package metadata change; a second run reuses .venv.
$(STAMP): requirements/core.txt requirements/dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import jax, flax, diffusers, torch; print('fvae env ok: jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'diffusers', diffusers.__version__)"
	touch $(STAMP)

# Two workers, one test file each at a time (a file's tests share fixtures and run in order).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=40 tests

# The notebook suite at the embedded default scale: 01-07 executed headless (papermill), figures/ and
# figures/claims.md written; runs cached by config hash under runs/suite (a second run takes minutes).
# It uses the Debian photographs and paintings when apt-get can fetch them (else the PyPI photos only).
demo: $(STAMP) debian-data
	$(PY) -m fvae_core.suite

# The Debian packages of the built-in `photos` (+24) and `painterly` (27) sources, unpacked (apt-get download +
# dpkg-deb -x; nothing installed, no Depends pulled) into .debian-data/ with their versions in VERSIONS. Done
# once (a complete folder is kept), atomically; one "skipped" line where apt-get is missing or fails. `make test`
# and CI do not use it.
debian-data: $(STAMP)
	$(PY) -m fvae_core.data.packaged fetch

demo-smoke: $(STAMP)
	$(PY) -m fvae_core.suite --smoke

# JupyterLab on the notebooks (installed on first use: it is not needed for tests or the demo).
lab: $(STAMP)
	$(PY) -m pip install -q -r requirements/lab.txt
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/

# After editing a notebook's .py (the reviewed text form), regenerate its .ipynb (outputs stay empty).
notebooks-sync: $(STAMP)
	$(VENV)/bin/jupytext --to ipynb notebooks/0*.py

bench: $(STAMP)
	$(PY) benchmarks/autoencoder.py

# The full finetune step against the PyTorch step (tiny, sd B1, sd B4; ~1 h on 2 cores), and the loader.
bench-step: $(STAMP)
	$(PY) benchmarks/train_step.py

bench-loader: $(STAMP)
	$(PY) benchmarks/loader_step.py

# On a CUDA machine (jax[cuda] in the venv): bf16, B32, 256², fvae vs torch eager and torch.compile.
bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu_step.py --out runs/bench-gpu

# The embedded default run: pretrain the tiny SD-shaped VAE, then finetune it with the card's recipe.
tiny: $(STAMP)
	$(VENV)/bin/fvae train --config tiny-cpu --run-dir runs/tiny-cpu
	$(VENV)/bin/fvae train --config tiny-cpu-finetune --set init=runs/tiny-cpu/export/diffusers --run-dir runs/tiny-cpu-finetune

# The base in the regime (issue 27): pretrain small-sd (~2 h on 2 cores), then write weights/small-cpu with
# its RECORD.json (128² numbers beside bicubic references) and figures/03_base_learning_curve.png.
small: $(STAMP)
	$(VENV)/bin/fvae train --config small-cpu --run-dir runs/small-cpu
	$(PY) weights/record_base.py runs/small-cpu weights/small-cpu

bench-data: $(STAMP)
	$(PY) benchmarks/data.py

bench-eval: $(STAMP)
	$(PY) benchmarks/eval.py

clean:
	rm -rf $(VENV) runs .pytest_cache
