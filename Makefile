# Two entry points: `make demo` runs the whole workflow on the bundled demo cohort,
# `make test` runs the test suite. Both create (or reuse) the virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.histopipe-installed
PYTEST_ARGS ?=
CORES ?= 2
DEMO_DIR ?= resources/demo

.PHONY: venv demo quality test lint profile clean-demo gpu-check

venv: $(STAMP)

# torch is pinned to the build this project is tested with (see README: Installation).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

DEMO_ARGS = --profile profiles/local --configfile config/config.yaml config/demo.yaml \
	config/presets/tiny.yaml --config sheet=$(DEMO_DIR)/slides.tsv

# The whole workflow on the demo cohort (demo-scale settings), then its HTML report.
demo: venv
	$(BIN)/histopipe demo-cohort $(DEMO_DIR)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --cores $(CORES) $(DEMO_ARGS)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake $(DEMO_ARGS) --report results/report.html
	@echo "demo done: results/ and results/report.html"

QUALITY_ARGS = --profile profiles/local --configfile config/config.yaml config/demo.yaml \
	config/presets/cpu.yaml config/quality.yaml --config sheet=$(DEMO_DIR)/slides.tsv
# Every model and evaluation job on one thread, $(CORES) at a time: on a CPU that gets ~1.8x
# the throughput of one job on all cores.
QUALITY_THREADS = train_vae=1 train_segmenter=1 train_ldm=1 synthesize=1 evaluate_distribution=1 \
	evaluate_segmentation=1 evaluate_fidelity=1 flag_hallucinations=1

# The quality run (config/presets/cpu.yaml on the demo cohort, about an hour on 2 cores): every
# variant trained, synthesised and evaluated; the summary goes to benchmarks/quality.md.
quality: venv
	start=$$(date +%s); \
	$(BIN)/histopipe demo-cohort $(DEMO_DIR) && \
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --cores $(CORES) $(QUALITY_ARGS) --resources gpu=$(CORES) \
		--set-threads $(QUALITY_THREADS) -- ablation && \
	echo "quality run: $$(( ($$(date +%s) - start) / 60 )) min on $(CORES) cores" | tee results/quality/wall.txt
	$(BIN)/python benchmarks/quality.py results/quality --out benchmarks/quality

# `snakemake --profile slurm` from any directory: links profiles/slurm into Snakemake's user
# profile folder (idempotent; stops rather than replace a profile of yours of that name).
profile: venv
	$(BIN)/histopipe install-profile slurm

# On a machine with one CUDA GPU (under 8 minutes): embedding, LDM training and sampling,
# VAE throughput -> results/gpu_check/gpu_check.{json,md}. GPU_CHECK_ARGS=--smoke: CPU, seconds.
GPU_CHECK_ARGS ?=
gpu-check: venv
	$(BIN)/python benchmarks/gpu_check.py --out results/gpu_check $(GPU_CHECK_ARGS)

test: venv
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests; that is a failure here" >&2; exit 1; fi; \
	exit $$rc

# The Snakefile reads the cohort sheet at parse time: the demo cohort is written first (once).
lint: venv
	$(BIN)/ruff check histopipe tests benchmarks
	test -f $(DEMO_DIR)/slides.tsv || $(BIN)/histopipe demo-cohort $(DEMO_DIR)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --lint $(DEMO_ARGS)
