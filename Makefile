# cvtasks: `make help` lists the targets and variables.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed

TASK       ?= classification
BACKBONE   ?= resnet18
DATA       ?=
EPOCHS     ?=
BATCH      ?=
IMG        ?=
DEVICES    ?=
STRATEGY   ?=
PRECISION  ?=
LOGGER     ?= wandb
RUN        ?=
HEAD       ?=
DETECTOR   ?=
ROI        ?=
PRETRAINED ?=
NAME       ?=
K          ?= 5
INPUT      ?=
PATTERN    ?=
PYTEST_ARGS ?=
TEST_JOBS  ?= 2
ARGS       ?=

TASKS := $(patsubst configs/%.yaml,%,$(wildcard configs/*.yaml))

# detector names, read from the table's one line per detector so that `make help` needs no venv;
# $(1) is ! for the detectors without instance masks (TASK=detection), empty for those with
detector_names = $(shell awk -F'"' '/^ *"[a-z0-9_]+": *DetectorSpec/ && $(1)/masks=True/ {printf "%s%s", sep, $$2; sep=" | "}' cvtasks/detection/models.py)

# the optional variables become CLI arguments only when set
CLI_ARGS = --config configs/$(TASK).yaml \
	$(if $(DATA),--config configs/data/$(TASK)_folder.yaml --data.root $(DATA)) \
	$(if $(LOGGER),--config configs/logger/$(LOGGER).yaml) \
	--model.backbone $(BACKBONE) \
	$(if $(HEAD),--model.head $(HEAD) --model.head_kwargs null) \
	$(if $(DETECTOR),--model.detector $(DETECTOR)) \
	$(if $(ROI),--model.roi $(ROI)) \
	$(if $(PRETRAINED),--model.pretrained $(PRETRAINED)) \
	$(if $(EPOCHS),--trainer.max_epochs $(EPOCHS)) \
	$(if $(BATCH),--data.batch_size $(BATCH)) \
	$(if $(IMG),--data.img_size $(IMG)) \
	$(if $(DEVICES),--trainer.devices $(DEVICES)) \
	$(if $(STRATEGY),--trainer.strategy $(STRATEGY)) \
	$(if $(PRECISION),--trainer.precision $(PRECISION)) \
	$(if $(RUN),--run_name $(RUN))

.PHONY: help setup lock check-task train evaluate predict resume backbones weights summary cv check-backbone test test-fast bench docs clean

help: ## show this help: targets, then variables with their defaults
	@echo "Targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'
	@echo ""
	@echo "Variables (make train VAR=value ...):"
	@echo "  TASK=$(TASK)       one of: $(TASKS)"
	@echo "  BACKBONE=$(BACKBONE)       any registered name (make backbones), or timm/<model>"
	@echo "  DATA=              a folder of real data (classification: one sub-folder per class; segmentation: VOC layout; detection: COCO json + images)"
	@echo "  EPOCHS=            training epochs (default: the task config's)"
	@echo "  BATCH=             batch size per device (default: the task config's)"
	@echo "  IMG=               image size in pixels (default: the task config's; make summary: 224)"
	@echo "  DEVICES=           devices per node, e.g. 2 (with STRATEGY=ddp)"
	@echo "  STRATEGY=          auto | ddp | ddp_spawn | ..."
	@echo "  PRECISION=         32-true | 16-mixed | bf16-mixed"
	@echo "  LOGGER=$(LOGGER)         wandb | csv | tensorboard"
	@echo "  RUN=               run name: the folder runs/<RUN>/ (default: task-backbone-time)"
	@echo "  HEAD=              segmentation head: fcn32s | fcn16s | fcn8s | deeplabv3 | unpool; classification: spp (resets the config's head_kwargs)"
	@echo "  DETECTOR=          $(call detector_names,!) (TASK=instance_segmentation: $(call detector_names,));  ROI=align | pool | spp"
	@echo "  PRETRAINED=        imagenet (the backbone's published weights; make backbones marks them), a URL or a local file"
	@echo "  K=$(K)                number of folds for make cv (each fold in turn is the test set)"
	@echo "  NAME=              backbone name(s) for make check-backbone, make summary and make weights"
	@echo "  INPUT=             folder of images for make predict"
	@echo "  ARGS=              passed to the CLI as they are, e.g. ARGS='--model.lr 0.01'"
	@echo "  TEST_JOBS=$(TEST_JOBS)        pytest processes for make test (pytest-xdist); PYTEST_ARGS= adds pytest options"

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,export]"
	@touch $(STAMP)

setup: $(STAMP) ## create the local virtual environment (.venv) and install everything (done by the other targets on first use)

lock: $(STAMP) ## rewrite constraints.txt from .venv: the exact versions make installs (run after make test passes)
	@{ sed -n '1,/^# Regenerate/p' constraints.txt; $(PY) -m pip freeze --exclude-editable; } > constraints.txt.new
	@mv constraints.txt.new constraints.txt
	@echo "constraints.txt: $$(grep -vc '^#' constraints.txt) pinned packages"

check-task:
	@test -f configs/$(TASK).yaml || { echo "error: unknown TASK '$(TASK)'; choose one of: $(TASKS)" >&2; exit 2; }
	@test -z "$(DATA)" || test -d "$(DATA)" || { echo "error: DATA folder '$(DATA)' does not exist; pass an existing folder" >&2; exit 2; }
	@test -z "$(DATA)" || test -f configs/data/$(TASK)_folder.yaml || { echo "error: TASK=$(TASK) has no real-data loader yet (configs/data/$(TASK)_folder.yaml)" >&2; exit 2; }
	@test -z "$(LOGGER)" || test -f configs/logger/$(LOGGER).yaml || { echo "error: unknown LOGGER '$(LOGGER)'; choose wandb, csv or tensorboard" >&2; exit 2; }

train: $(STAMP) check-task ## train TASK with BACKBONE on DATA (default: the generated shapes); writes runs/<RUN>/
	$(PY) -m cvtasks fit $(CLI_ARGS) $(ARGS)

cv: $(STAMP) check-task ## k-fold cross-validation (K=5 TASK BACKBONE [DATA] [EPOCHS] [RUN]): a run per fold, mean ± std; again to continue
	$(PY) -m cvtasks cv --folds $(K) $(CLI_ARGS) $(ARGS)

evaluate: $(STAMP) ## evaluate a run's best checkpoint on its test split (RUN=...); writes runs/<RUN>/test_metrics.json
	@test -n "$(RUN)" || { echo "error: make evaluate needs RUN=<run name>; see ls runs/" >&2; exit 2; }
	$(PY) -m cvtasks evaluate $(RUN) $(ARGS)

predict: $(STAMP) ## predict on a folder of images with a run's best checkpoint (RUN=... INPUT=folder)
	@test -n "$(RUN)" -a -n "$(INPUT)" || { echo "error: make predict needs RUN=<run> and INPUT=<folder of images>" >&2; exit 2; }
	$(PY) -m cvtasks predict-run $(RUN) $(INPUT) $(ARGS)

resume: $(STAMP) ## continue an interrupted run from its folder alone (RUN=...)
	@test -n "$(RUN)" || { echo "error: make resume needs RUN=<run name>; see ls runs/" >&2; exit 2; }
	$(PY) -m cvtasks resume $(RUN) $(ARGS)

backbones: $(STAMP) ## list registered backbones: family, params, GFLOPs at 224, strides/channels, reference, published weights (PATTERN=...)
	$(PY) -m cvtasks backbones $(PATTERN) $(ARGS)

weights: $(STAMP) ## fetch published weights into the cache ahead of time, for machines without internet (NAME=resnet18 ...)
	@test -n "$(NAME)" || { echo "error: make weights needs NAME=<backbone>; make backbones marks the names with published weights" >&2; exit 2; }
	$(PY) -m cvtasks weights $(NAME) $(ARGS)

summary: $(STAMP) ## the anatomy of a net, layer by layer: output, params, mult-adds, stride, receptive field (NAME=... [IMG=224])
	@test -n "$(NAME)" || { echo "error: make summary needs NAME=<backbone>; see make backbones" >&2; exit 2; }
	$(PY) -m cvtasks summary $(NAME) --size $(or $(IMG),224) $(ARGS)

check-backbone: $(STAMP) ## run the conformance checks on a registered backbone (NAME=...)
	@test -n "$(NAME)" || { echo "error: make check-backbone needs NAME=<backbone>; see make backbones" >&2; exit 2; }
	$(PY) -m cvtasks check-backbone $(NAME) $(ARGS)

test: $(STAMP) ## run the whole test suite (heavier tests included), in TEST_JOBS processes
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadgroup $(PYTEST_ARGS)

test-fast: $(STAMP) ## run the tests not marked slow
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadgroup -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP) ## side-by-side benchmarks: native backbones vs reference, Lightning vs a plain loop
	$(PY) -m benchmarks $(ARGS)

docs: $(STAMP) ## regenerate docs/backbones.md from what the checks observe
	$(PY) -m benchmarks.backbone_docs --compile $(ARGS)

clean: ## remove runs/, caches (keeps .venv)
	rm -rf runs lightning_logs wandb .pytest_cache
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
