# xray-edge: the two commands of the README are `make train export` and `make test`.
# Every target installs what it needs into .venv (and .venv-tflite for tflite-runtime) first.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= artifacts
DATA   ?=
# The embedded phantom set is sized for a few minutes on a 2-core CPU; real data gets the recipe's 30.
EPOCHS ?= $(if $(DATA),30,10)
TRAIN_ARGS ?=
EXPORT_ARGS ?=
TFLITE_VENV := .venv-tflite

BENCH_IMAGES ?= 20000

.PHONY: FORCE help install train export report study test pi-test bench bench-train bench-data gate-eval likeness data clean

help:
	@echo "make train [DATA=path] [EPOCHS=n]   train (default: synthetic phantoms, offline); DATA=\"A B\": two sources"
	@echo "make export                          TFLite float32 + int8 and ONNX, proven vs Keras"
	@echo "make report                          per-format table: size, speed, parity, clinical figures"
	@echo "make study [STUDY_ARGS=...]          the recipe study of docs/training.md (needs ../shared/data)"
	@echo "make test                            the test suite (what CI runs)"
	@echo "make pi-test                         classify on arm64 Debian 12 under qemu, compare with host"
	@echo "make bench | bench-train             speed figures for the edge runner / training"
	@echo "make bench-data [BENCH_IMAGES=n]     decode + batch throughput and peak memory, n synthetic images"
	@echo "make gate-eval [GATE_DATA=path] [GATE_ARGS='--refuse DIR']  the input gate per set of films and non-films"
	@echo "make likeness [GATE_DATA=path] [GATE_ARGS='--refuse DIR']   refit the gate's likeness score (edge/likeness.json)"
	@echo "make data                            fetch the tutorial's dataset into data/ (needs network)"

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[export,dicom,serve,test]"
	@touch $@

install: $(BIN)/.installed

# What the GPU step depends on: nvidia-smi's answer (GPU names and driver, or why there is none),
# asked once per make for at most 5 s and rewritten only when it changes, so a driver update, a
# GPU appearing or a hung nvidia-smi recovering redoes the step below. Training reads the same
# answer (XRAY_EDGE_SMI_ANSWER) instead of asking again.
$(BIN)/.gpu-answer: FORCE $(BIN)/.installed
	@$(BIN)/python -m xray_edge.train.device --state > $@.new || { rm -f $@.new; exit 1; }; \
	cmp -s $@.new $@ && rm -f $@.new || mv $@.new $@

# Where nvidia-smi lists a GPU, training gets JAX with the CUDA wheels its driver runs (the CLI
# then trains with KERAS_BACKEND=jax); without nvidia-smi this installs nothing. A failed
# install is retried by the next make and leaves training on the CPU meanwhile.
$(BIN)/.gpu: $(BIN)/.gpu-answer $(BIN)/.installed
	@extra=$$($(BIN)/python -m xray_edge.train.device --pip-extra --answer $(BIN)/.gpu-answer) || exit 1; \
	if [ -z "$$extra" ]; then touch $@; \
	else echo "NVIDIA GPU found: installing xray-edge[$$extra] (JAX with CUDA) for training"; \
	  if $(BIN)/pip install -q --disable-pip-version-check -e ".[export,dicom,serve,test,$$extra]"; then touch $@; \
	  else echo "warning: could not install xray-edge[$$extra]; training runs on the CPU" >&2; fi; fi

FORCE:

train: $(BIN)/.gpu
	XRAY_EDGE_SMI_ANSWER=$(BIN)/.gpu-answer $(BIN)/xray-edge train $(foreach d,$(DATA),--data "$(d)") --epochs $(EPOCHS) --out "$(OUT)" $(TRAIN_ARGS)

export: $(BIN)/.installed
	$(BIN)/xray-edge export --model "$(OUT)/model.keras" $(EXPORT_ARGS)

report: $(BIN)/.installed
	$(BIN)/xray-edge report --artifacts "$(OUT)" $(REPORT_ARGS)

# The recipe study of docs/training.md (needs ../shared/data): candidates x seeds, one table.
SHARED ?= ../shared/data
STUDY_ARGS ?=
study: $(BIN)/.installed
	$(BIN)/python tests/tools/recipe_study.py --shared "$(SHARED)" $(STUDY_ARGS)

# tflite-runtime 2.14 needs numpy<2 and Python <= 3.11: it gets its own environment, with the
# edge package only (no TensorFlow), exactly as on a device.
$(TFLITE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TFLITE_VENV)
	@# no stamp on failure: the next make retries instead of skipping tflite-runtime's tests for good
	$(TFLITE_VENV)/bin/pip install -q --disable-pip-version-check -e ".[tflite]" || \
	  { rm -rf $(TFLITE_VENV); echo "error: could not install tflite-runtime into $(TFLITE_VENV) (see pip's message above)" >&2; exit 1; }
	@touch $@

test: $(BIN)/.installed $(TFLITE_VENV)/.installed
	@# tflite-runtime beside numpy 2 too, without its deps: the tests check the runner's advice
	-$(BIN)/pip install -q --disable-pip-version-check --no-deps "tflite-runtime; python_version<'3.12'"
	XRAY_EDGE_TFLITE_PYTHON=$(abspath $(TFLITE_VENV))/bin/python $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The edge runner on a Raspberry Pi's software stack (arm64 Debian 12, Python 3.11) under qemu-user.
pi-test: $(BIN)/.installed $(TFLITE_VENV)/.installed
	@# qemu-user-static is a Debian package: installed here with apt-get (root) when missing
	@command -v qemu-aarch64-static >/dev/null || { echo "installing qemu-user-static with apt-get" >&2; \
	  apt-get update -qq && apt-get install -y -qq qemu-user-static >/dev/null; } || \
	  { echo "error: make pi-test needs qemu-user-static; install it as root: apt-get install qemu-user-static" >&2; exit 1; }
	XRAY_EDGE_TFLITE_PYTHON=$(abspath $(TFLITE_VENV))/bin/python $(BIN)/python tests/tools/emulated_pi.py $(PI_ARGS)

bench: $(BIN)/.installed
	$(BIN)/python tests/tools/bench_edge.py --artifacts "$(OUT)"

bench-train: $(BIN)/.gpu
	$(BIN)/python tests/tools/bench_train.py

# Input pipeline only (no model): phantoms drawn into data/bench, decoded into the cache, one
# shuffled epoch of batches; prints images/s and the peak resident memory.
bench-data: $(BIN)/.installed
	$(BIN)/python tests/tools/bench_data.py --images $(BENCH_IMAGES) --out data/bench

# The input gate's evidence: accepted/refused per set (real films of GATE_DATA, phantoms, built
# non-radiographs, pydicom's test files); exit 1 when a set misses its target (docs/edge.md).
# Your own sets: GATE_ARGS="--refuse DIR --accept DIR" (folders of non-radiographs / chest films).
GATE_DATA ?= ../shared/data
GATE_ARGS ?=
gate-eval: $(BIN)/.installed
	$(BIN)/python tests/tools/gate_eval.py --data "$(GATE_DATA)" $(GATE_ARGS)

# Refit the gate's likeness score to the real films of GATE_DATA, the phantoms and the built
# non-radiographs, print its leave-one-out checks, and store it in edge/likeness.json.
likeness: $(BIN)/.installed
	cd tests/tools && $(abspath $(BIN))/python fit_likeness.py --data "$(abspath $(GATE_DATA))" --write $(GATE_ARGS)

data:
	@mkdir -p data
	@if [ -d data/education454-datasets/.git ]; then echo "data/education454-datasets already there"; \
	elif git clone -q --depth 1 https://github.com/education454/datasets.git data/education454-datasets 2>/dev/null; then \
	  echo "fetched: make train DATA=data/education454-datasets/Data"; \
	else echo "error: cannot fetch the tutorial's dataset (offline?). Copy a folder laid out as DATA/train/<class>/* and run: make train DATA=path" >&2; exit 1; fi

clean:
	rm -rf $(OUT) data/phantom data/bench build *.egg-info

# The service under load: films/s and receive-to-result p50/p99 through DICOM and a watched
# folder, resident memory at start and end (SERVE_FILMS=200 for a quick run).
SERVE_FILMS ?= 2000
.PHONY: bench-serve bundle
bench-serve: $(BIN)/.installed
	$(BIN)/python tests/tools/bench_serve.py --films $(SERVE_FILMS) --artifacts "$(OUT)"

# One archive for the device: wheel, the manifest's default model file, manifest (+ site.json),
# systemd unit and install script (docs/serve.md). On the Pi: tar xzf ... && sudo ./install.sh
bundle: $(BIN)/.installed
	$(BIN)/python packaging/make_bundle.py --artifacts "$(OUT)" --out dist
