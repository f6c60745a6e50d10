# Set-up and everyday commands. `make test` and `make serve` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of PyTorch, installed first when no NVIDIA GPU is present so that the plain
# `torch>=2.4` requirement does not pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.oaml-installed
export OMP_NUM_THREADS ?= 2
export OMP_WAIT_POLICY ?= PASSIVE

# Training data and run folders live outside the repository.
SHARED ?= ../shared/data
DATA ?= ../oaml_data
RUN ?= ../oaml_runs/ir18_default
# The preemptible background run of model v3's CPU recipe (make train-background).
RUN_BACKGROUND ?= ../oaml_runs/v3_background
BACKGROUND_CONFIG ?= configs/oaml_ir18_v3_cpu.toml
# A folder on storage that outlives this machine (a mounted bucket, NFS): each checkpoint is copied there, and the
# run resumes from it on a new machine (docs/training.md, "Offsite copy"). Empty: no copy.
OFFSITE ?=
IONICE := $(shell command -v ionice >/dev/null 2>&1 && echo ionice -c3)
WEIGHTS ?= weights/oaml_ir18.safetensors

.PHONY: install lint test test-slow gpu-bundle docker-engine docker-test browser postgres serve bench bench-service bench-stages bench-gallery bench-ann prepare-data train-default train-background train-status train-pause train-resume train-stop train-release eval clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
			echo "NVIDIA GPU found: installing the default (CUDA) torch build"; \
		else \
			echo "no GPU: installing $(TORCH_CPU)"; $(BIN)/pip install -q "$(TORCH_CPU)"; \
		fi; \
	fi
	$(BIN)/pip install -q -e ".[server,client,test,train,lint,postgres]"
	touch $(STAMP)

install: $(STAMP)

test: install browser postgres
	$(BIN)/python -m pytest -q

# Headless Chromium for the demo page's browser tests (skipped, with a reason, where it cannot be installed).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing chromium and chromium-driver for the browser tests"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
			{ apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
			echo "could not install chromium: the browser tests will be skipped"; \
		else echo "no chromium (needs root and apt): the browser tests will be skipped"; fi; }

# PostgreSQL server binaries for the shared-store tests (the suite starts its own server; skipped, with a
# reason, where they cannot be installed).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing postgresql for the shared-store tests"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1 || \
			{ apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1; } || \
			echo "could not install postgresql: the shared-store tests will be skipped"; \
		else echo "no postgresql (needs root and apt): the shared-store tests will be skipped"; fi; }

# Style and types: ruff (lint + format check) over the tree, mypy over model/, service/ and oaml/.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Real-data checks of the shipped weights' published numbers (minutes; needs ../shared/data).
test-slow: prepare-data
	OAML_PREPARED_DATA=$(abspath $(DATA)) $(BIN)/python -m pytest -q --run-slow -m slow

# The Docker image built from the Dockerfile on a debootstrap base and run: health, /verify, an enrolment
# kept across a restart, the non-root user, no open start without keys; then deploy/compose.yaml with
# PostgreSQL, two replicas and nginx (tests/test_docker.py, minutes).
# Debian's docker client is preferred: it builds with the engine's BuildKit without the buildx plugin.
DOCKER ?= $(shell [ -x /usr/bin/docker ] && echo /usr/bin/docker || command -v docker)
docker-test: install docker-engine
	@if $(DOCKER) info >/dev/null 2>&1 && ! ls deploy/wheels/torch-*.whl >/dev/null 2>&1; then \
		$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
			--platform manylinux_2_28_x86_64 -d deploy/wheels "$(TORCH_CPU)"; fi
	OAML_DOCKER=$(DOCKER) $(BIN)/python -m pytest -q --run-docker -m docker tests/test_docker.py

# A Docker engine for docker-test: Debian's docker.io, docker-compose and debootstrap, dockerd without bridge or
# iptables (containers use the host's network). Where it cannot be had (not root, no apt), docker-test skips.
# The client is looked up after the install (DOCKER, above, is fixed when make starts).
docker-engine:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		{ command -v dockerd >/dev/null && command -v debootstrap >/dev/null && command -v docker-compose >/dev/null; } || { \
			echo "installing docker.io, docker-compose and debootstrap for the Docker image tests"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io docker-compose debootstrap >/dev/null 2>&1 || \
			{ apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io docker-compose debootstrap >/dev/null 2>&1; } || \
			echo "could not install docker.io: the Docker tests will be skipped"; }; \
		client="$$( [ -x /usr/bin/docker ] && echo /usr/bin/docker || command -v docker || true)"; \
		if [ -n "$$client" ] && command -v dockerd >/dev/null && ! "$$client" info >/dev/null 2>&1; then \
			echo "starting dockerd (--bridge=none --iptables=false, log in /var/log/oaml-dockerd.log)"; \
			nohup dockerd --bridge=none --iptables=false >/var/log/oaml-dockerd.log 2>&1 & \
			for i in $$(seq 60); do "$$client" info >/dev/null 2>&1 && break; sleep 1; done; \
		fi; \
	else echo "no Docker engine can be installed here (needs root and apt): the Docker tests will be skipped"; fi

serve: install
	$(BIN)/oaml serve

bench: install
	$(BIN)/python bench/bench_model.py --out bench/RESULTS.md

bench-service: install
	$(BIN)/python bench/bench_service.py --out bench/RESULTS.md

bench-stages: install
	$(BIN)/python bench/bench_stages.py --out bench/RESULTS.md

bench-gallery: install
	$(BIN)/python bench/bench_gallery.py --out bench/RESULTS.md

bench-ann: install
	$(BIN)/python bench/bench_ann.py --out bench/RESULTS.md --real $(SHARED)/train/aligned/celeba_extra $(DATA)/celeba

prepare-data: install
	$(BIN)/oaml prepare $(SHARED)/train/celeba $(DATA)/celeba
	$(BIN)/oaml prepare $(SHARED)/train/afdb $(DATA)/afdb
	$(BIN)/oaml prepare $(SHARED)/eval/lfw $(DATA)/lfw
	ln -sfn "$(abspath $(SHARED)/occluders)" $(DATA)/occluders
	for cache in celeba_extra lag fgnet utkface mask_unlabeled aflw2000; do \
		ln -sfn "$(abspath $(SHARED)/train/aligned)/$$cache" $(DATA)/$$cache; done

# A GPU run of model v3 (README, "A GPU run"): the recipe's data in parts that one command each can carry,
# the recipe, PARTS.json and run.sh, in bundle/ (git-ignored). INIT=weights/oaml_ir18.safetensors starts from
# the shipped weights (one more part).
gpu-bundle: prepare-data
	rm -rf bundle
	$(BIN)/oaml gpu-bundle bundle --config configs/oaml_ir18_v3.toml --data-root $(DATA) $(if $(INIT),--init-from $(INIT))

# Reproduces the shipped weights: same recipe and seed (bits may differ across hardware).
train-default: prepare-data
	$(BIN)/oaml train --config configs/oaml_ir18.toml --data-root $(DATA) --out $(RUN)
	$(BIN)/oaml train --config configs/oaml_ir18_distill.toml --data-root $(DATA) --out $(RUN)_distill --init-from $(RUN)/final.safetensors
	$(BIN)/oaml train --config configs/oaml_ir18_heads.toml --data-root $(DATA) --out $(RUN)_heads --init-from $(RUN)_distill/best.safetensors
	$(BIN)/oaml calibrate $(RUN)_heads/best.safetensors --data-root $(DATA) --holdout $(SHARED)/train/aligned/celeba_extra \
		--dtype float16 --out $(WEIGHTS) --plot weights/reliability.png
	$(BIN)/oaml calibrate-identify $(WEIGHTS) --data-root $(DATA) --holdout $(SHARED)/train/aligned/celeba_extra

# Model v3's CPU recipe for days at the lowest priority (README, "Preemptible background training"): starts the run
# in RUN_BACKGROUND, or resumes it from its newest whole checkpoint; does nothing while it runs. nice 19, idle I/O
# class, its own session (setsid; train.pid holds its process group, train.log its output) whose scheduler autogroup
# is niced too (with autogroups, on by default in most kernels, a new session otherwise gets an equal share of the
# CPU with every other session whatever its processes' nice: measured here, 95% of a core against 60% for a nice 5
# job in the login session before, 6% after); the trainer (not the loop that restarts it) is the first process the
# kernel kills when memory runs out (oom_score_adj 1000), resumed RESTART_S after such a kill; checkpoints every 3
# minutes and on SIGTERM. (The loop once carried the 1000 too: a later out-of-memory event killed it, tiny as it
# was, and with it the restarts.)
RESTART_S ?= 300
train-background: prepare-data
	@mkdir -p $(RUN_BACKGROUND)
	@if $(BIN)/oaml train-control $(RUN_BACKGROUND) check >/dev/null; then \
		echo "already running: $$($(BIN)/oaml train-control $(RUN_BACKGROUND) check) (make train-status)"; exit 0; fi; \
	setsid nohup nice -n 19 $(IONICE) sh -c 'echo $$$$ > "$(RUN_BACKGROUND)/train.pid"; \
		echo 19 > /proc/self/autogroup 2>/dev/null; \
		while :; do sh -c "echo 1000 > /proc/self/oom_score_adj 2>/dev/null; exec \"\$$0\" \"\$$@\"" \
			$(abspath $(BIN))/oaml train --config $(BACKGROUND_CONFIG) --data-root $(DATA) \
			--out $(RUN_BACKGROUND) --init-from $(WEIGHTS) --preemptible $(if $(OFFSITE),--offsite $(abspath $(OFFSITE))) \
			< /dev/null; rc=$$?; \
			[ $$rc -eq 137 ] || exit $$rc; \
			echo "$$(date -Is) killed (SIGKILL: out of memory?): resuming in $(RESTART_S) s"; sleep $(RESTART_S); \
		done' < /dev/null >> $(RUN_BACKGROUND)/train.log 2>&1 & \
	sleep 3; if $(BIN)/oaml train-control $(RUN_BACKGROUND) check >/dev/null; then \
		echo "training in the background: process group $$(cat $(RUN_BACKGROUND)/train.pid)," \
			"log $(RUN_BACKGROUND)/train.log (make train-status)"; \
	else echo "the run did not start: see $(RUN_BACKGROUND)/train.log"; tail -5 $(RUN_BACKGROUND)/train.log; exit 1; fi

# Samples done, samples/s, validation curve, time since the last checkpoint, running or paused.
train-status: install
	@$(BIN)/oaml train-status $(RUN_BACKGROUND)

# SIGSTOP / SIGCONT the run's process group (for benchmarks); train-stop: SIGTERM, it checkpoints and exits.
train-pause: install
	@$(BIN)/oaml train-control $(RUN_BACKGROUND) pause

train-resume: install
	@$(BIN)/oaml train-control $(RUN_BACKGROUND) resume

train-stop: install
	@$(BIN)/oaml train-control $(RUN_BACKGROUND) stop

# When train-status says the release rule is met: calibrate the run's best model and run the public suite on it
# and on the shipped weights (about 50 minutes each here; RELEASE_ARGS="--shipped-report DIR" reuses a kept report
# of the shipped weights from this machine); $(RUN_BACKGROUND)/release/release.md says whether it ships (exit 0)
# or not (exit 2); before the rule is met nothing runs (exit 3). Pause the background run first (make
# train-pause): both want the two cores.
train-release: prepare-data
	nice -n 5 $(BIN)/oaml train-release $(RUN_BACKGROUND) --data-root $(DATA) --shared $(SHARED) \
		--shipped $(WEIGHTS) $(RELEASE_ARGS)

eval: prepare-data
	$(BIN)/oaml eval $(WEIGHTS) --suite public --data-root $(DATA) --shared $(SHARED) --peer sface --out $(RUN)/eval
	$(BIN)/oaml eval $(WEIGHTS) --lfw-cache $(DATA)/lfw --pairs $(SHARED)/eval/lfw/pairs.txt \
		--occluders $(SHARED)/occluders --peer sface --out $(RUN)/eval
	$(BIN)/oaml eval-identify $(WEIGHTS) --lfw-cache $(DATA)/lfw --occluders $(SHARED)/occluders \
		--peer sface --out $(RUN)/eval

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
