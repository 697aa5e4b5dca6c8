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
AUG        ?=
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
RUNS       ?=
REFERENCE  ?=
TRAIN      ?=
BACKBONES  ?=
OUT        ?=
TRIALS     ?= 20
SPACE      ?=
STORAGE    ?=
INPUT      ?=
FORMAT     ?= onnx
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
	$(if $(EPOCHS),--trainer.max_epochs $(EPOCHS) --train_steps null) \
	$(if $(BATCH),--data.batch_size $(BATCH)) \
	$(if $(IMG),--data.img_size $(IMG)) \
	$(if $(AUG),--data.augmentation $(AUG)) \
	$(if $(DEVICES),--trainer.devices $(DEVICES)) \
	$(if $(STRATEGY),--trainer.strategy $(STRATEGY)) \
	$(if $(PRECISION),--trainer.precision $(PRECISION)) \
	$(if $(RUN),--run_name $(RUN))

.PHONY: help setup lock check-task train evaluate predict export resume backbones weights summary cv compare search check-backbone test test-fast baseline bench docs clean

help: ## show this help: targets, then variables with their defaults
	@echo "Targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'
	@echo ""
	@echo "Variables (make train VAR=value ...):"
	@echo "  TASK=$(TASK)       one of: $(TASKS)"
	@echo "  BACKBONE=$(BACKBONE)       any registered name (make backbones), or timm/<model>"
	@echo "  DATA=              a folder of real data (classification: one sub-folder per class; segmentation: VOC layout; detection: COCO json + images)"
	@echo "  EPOCHS=            training epochs, exactly (default: the task config's; with DATA=, the epochs that reach its train_steps)"
	@echo "  BATCH=             batch size per device (default: the task config's)"
	@echo "  IMG=               image size in pixels (default: the task config's; with DATA=, auto: the images' median longer side; make summary: 224)"
	@echo "  AUG=               augmentation preset with DATA= (classification: safe | natural | documents | aerial | none; others: natural | safe | aerial | none)"
	@echo "  DEVICES=           devices per node, e.g. 2 (with STRATEGY=ddp)"
	@echo "  STRATEGY=          auto | ddp | ddp_spawn | ..."
	@echo "  PRECISION=         32-true | 16-mixed | bf16-mixed"
	@echo "  LOGGER=$(LOGGER)         wandb | csv | tensorboard"
	@echo "  RUN=               run name: the folder runs/<RUN>/ (default: task-backbone-time)"
	@echo "  HEAD=              segmentation head: fcn32s | fcn16s | fcn8s | fcn | deeplabv3 | unpool; classification: spp (resets the config's head_kwargs)"
	@echo "  DETECTOR=          $(call detector_names,!) (TASK=instance_segmentation: $(call detector_names,));  ROI=align | pool | spp"
	@echo "  PRETRAINED=        imagenet (the backbone's published weights; make backbones marks them), a URL or a local file;"
	@echo "                     coco: torchvision's whole COCO detector (faster_rcnn mask_rcnn retinanet fcos on resnet50, ssd on vgg16),"
	@echo "                     coco_voc: its FCN / DeepLabV3 on resnet50 with the 21 VOC labels (HEAD=fcn | deeplabv3)"
	@echo "  K=$(K)                number of folds for make cv (each fold in turn is the test set)"
	@echo "  RUNS=              runs of one task for make compare, e.g. RUNS='run-a run-b'"
	@echo "  REFERENCE=         make compare REFERENCE=imagenet: the registry's nets from published ImageNet figures"
	@echo "  TRAIN=1 BACKBONES= make compare: train each of BACKBONES='resnet18 mobilenet_v2 ...' on TASK first (RUN= to continue)"
	@echo "  OUT=               make compare: also write the PNG (with its .md and .json) here, e.g. OUT=docs/compare.png"
	@echo "  TRIALS=$(TRIALS)         make search: trials in all, over every process sharing the study"
	@echo "  SPACE=             make search: the search space (default: configs/search/<TASK>.yaml)"
	@echo "  STORAGE=           make search: the study's database, e.g. postgresql://user@host/db (default: runs/<RUN>/study.db)"
	@echo "  NAME=              backbone name(s) for make check-backbone, make summary and make weights;"
	@echo "                     make weights also takes task presets <detector or head>:<preset>, e.g. faster_rcnn:coco deeplabv3:coco_voc"
	@echo "  INPUT=             folder of images for make predict"
	@echo "  FORMAT=$(FORMAT)        make export's format: onnx | torchscript | exported_program"
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

compare: $(STAMP) check-task ## metric against GFLOPs, circle area by params, for RUNS='a b' | REFERENCE=imagenet | TRAIN=1 BACKBONES='a b'
	$(PY) -m cvtasks compare $(RUNS) $(if $(REFERENCE),--reference $(REFERENCE)) $(if $(OUT),--out $(OUT)) \
		$(if $(LOGGER),--logger configs/logger/$(LOGGER).yaml) $(if $(RUN),--run_name $(RUN)) \
		$(if $(filter 1,$(TRAIN)),--train --backbones '$(BACKBONES)' $(CLI_ARGS)) $(ARGS)

search: $(STAMP) check-task ## hyperparameter search with Optuna (TASK TRIALS=20 SPACE=... [STORAGE=...] [RUN]): a run per trial, best.yaml
	$(PY) -m cvtasks search --trials $(TRIALS) --space $(or $(SPACE),configs/search/$(TASK).yaml) \
		$(if $(STORAGE),--storage '$(STORAGE)') $(CLI_ARGS) $(ARGS)

evaluate: $(STAMP) ## evaluate a run's best checkpoint on its test split (RUN=...); writes runs/<RUN>/test_metrics.json
	@test -n "$(RUN)" || { echo "error: make evaluate needs RUN=<run name>; see ls runs/" >&2; exit 2; }
	$(PY) -m cvtasks evaluate $(RUN) $(ARGS)

predict: $(STAMP) ## predict on a folder of images with a run's best checkpoint (RUN=... INPUT=folder; ARGS='--backend onnx': with its export)
	@test -n "$(RUN)" -a -n "$(INPUT)" || { echo "error: make predict needs RUN=<run> and INPUT=<folder of images>" >&2; exit 2; }
	$(PY) -m cvtasks predict-run $(RUN) $(INPUT) $(ARGS)

export: $(STAMP) ## export a run's best model and check it against PyTorch on its val split (RUN=... [FORMAT=onnx]); writes runs/<RUN>/export/
	@test -n "$(RUN)" || { echo "error: make export needs RUN=<run name>; see ls runs/" >&2; exit 2; }
	$(PY) -m cvtasks export $(RUN) --format $(FORMAT) $(ARGS)

resume: $(STAMP) ## continue an interrupted run from its folder alone (RUN=...)
	@test -n "$(RUN)" || { echo "error: make resume needs RUN=<run name>; see ls runs/" >&2; exit 2; }
	$(PY) -m cvtasks resume $(RUN) $(ARGS)

backbones: $(STAMP) ## list registered backbones: family, params, GFLOPs at 224, strides/channels, reference, published weights (PATTERN=...)
	$(PY) -m cvtasks backbones $(PATTERN) $(ARGS)

weights: $(STAMP) ## fetch published weights into the cache ahead of time, for machines without internet (NAME='resnet18 faster_rcnn:coco' ...)
	@test -n "$(NAME)" || { echo "error: make weights needs NAME=<backbone> or <detector or head>:<preset> (e.g. faster_rcnn:coco); make backbones marks the backbones with published weights" >&2; exit 2; }
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

baseline: $(STAMP) ## classical baselines a CNN must beat on DATA= (SVM, logistic regression on pixels; same split as make train)
	@test -n "$(DATA)" || { echo "error: make baseline needs DATA=<folder with one sub-folder of images per class>" >&2; exit 2; }
	$(PY) -m benchmarks baseline $(DATA) $(ARGS)

bench: $(STAMP) ## side-by-side benchmarks: native backbones vs reference, Lightning vs a plain loop, the data path, R-CNN vs Fast/Faster R-CNN (python -m benchmarks throughput: GPU)
	$(PY) -m benchmarks $(ARGS)

docs: $(STAMP) ## regenerate docs/backbones.md from what the checks observe
	$(PY) -m benchmarks.backbone_docs --compile $(ARGS)

clean: ## remove runs/, caches (keeps .venv)
	rm -rf runs lightning_logs wandb .pytest_cache
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
