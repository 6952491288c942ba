# The whole pipeline, one target a stage. `make sft rm ppo` runs what is not yet done:
# each stage target depends on its manifest, written last, so a finished stage is not rerun.
# RECIPE picks the stage configs: story (default; configs/<stage>.yaml) or a folder of configs/recipes/, e.g.
# RECIPE=assistant (configs/recipes/assistant/<stage>.yaml). A recipe other than story gets its own run folder.
RECIPE ?= story
RECIPE_DIR := $(if $(filter story,$(RECIPE)),configs,configs/recipes/$(RECIPE))
$(if $(wildcard $(RECIPE_DIR)/*.yaml),,$(error RECIPE=$(RECIPE): no configs in $(RECIPE_DIR); use story or one of: $(notdir $(wildcard configs/recipes/*))))
cfg = $(firstword $(wildcard $(RECIPE_DIR)/$(1).yaml) configs/$(1).yaml)
RUN ?= $(if $(filter story,$(RECIPE)),default,$(RECIPE))
ACCELERATE_CONFIG ?= configs/accelerate/cpu.yaml
ARGS ?=
MODEL ?=
MODEL_ARG := $(if $(MODEL),--model_config $(MODEL))
PY ?= .venv/bin/python
VENV_BIN := $(abspath .venv/bin)
RUNDIR := runs/$(RUN)
# One thread per process: on a shared 2-core box torch's default threading is many times slower (STACK-NOTES).
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export GRADIO_ANALYTICS_ENABLED ?= False
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false

# Two CPU processes: accelerate's multi-GPU launcher with every rank on the CPU (configs/accelerate/cpu2.yaml).
ifneq (,$(findstring cpu2.yaml,$(ACCELERATE_CONFIG)))
export ACCELERATE_USE_CPU = 1
endif
LAUNCH = $(VENV_BIN)/accelerate launch --config_file $(ACCELERATE_CONFIG) -m

.PHONY: setup test base sft rm ppo grpo rloo pairs label label-export simulate eval publish bench bench-sft bench-ppo clean-run

setup: .venv/.done
.venv/.done: pyproject.toml constraints.txt
	test -d .venv || python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	# torch first and pinned: left free, pip would pull a multi-GB CUDA build.
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

test: setup
	$(PY) -m pytest -q tests

base: setup
	$(PY) -m stages.base --config configs/base.yaml $(ARGS)

sft: $(RUNDIR)/sft/manifest.json
$(RUNDIR)/sft/manifest.json: | setup
	$(LAUNCH) stages.sft --config $(call cfg,sft) --run $(RUN) $(MODEL_ARG) $(ARGS)

clean-run:
	rm -rf $(RUNDIR)

rm: $(RUNDIR)/rm/manifest.json
$(RUNDIR)/rm/manifest.json: $(RUNDIR)/sft/manifest.json
	$(LAUNCH) stages.rm --config $(call cfg,rm) --run $(RUN) $(MODEL_ARG) $(ARGS)

ppo: $(RUNDIR)/ppo/manifest.json
$(RUNDIR)/ppo/manifest.json: $(RUNDIR)/sft/manifest.json $(RUNDIR)/rm/manifest.json
	$(LAUNCH) stages.ppo --config $(call cfg,ppo) --run $(RUN) $(MODEL_ARG) $(ARGS)

# The critic-free estimators: the same RL loop (stages/ppo/) with configs/grpo.yaml or rloo.yaml, own run folders.
grpo: $(RUNDIR)/grpo/manifest.json
$(RUNDIR)/grpo/manifest.json: $(RUNDIR)/sft/manifest.json $(RUNDIR)/rm/manifest.json
	$(LAUNCH) stages.ppo --config $(call cfg,grpo) --run $(RUN) $(MODEL_ARG) $(ARGS)

rloo: $(RUNDIR)/rloo/manifest.json
$(RUNDIR)/rloo/manifest.json: $(RUNDIR)/sft/manifest.json $(RUNDIR)/rm/manifest.json
	$(LAUNCH) stages.ppo --config $(call cfg,rloo) --run $(RUN) $(MODEL_ARG) $(ARGS)

pairs: $(RUNDIR)/pairs/manifest.json
$(RUNDIR)/pairs/manifest.json: $(RUNDIR)/sft/manifest.json
	$(LAUNCH) stages.pairs --config $(call cfg,pairs) --run $(RUN) $(MODEL_ARG) $(ARGS)

# The labeling UI is a server, not a batch job: it always runs (and resumes from the label store).
# With ARGS="--pairs_dataset FILE" (e.g. eval's human_pairs.jsonl) it needs no pairs stage.
label: $(if $(findstring --pairs_dataset,$(ARGS)),,$(RUNDIR)/pairs/manifest.json)
	$(PY) -m stages.label --config configs/label.yaml --run $(RUN) $(ARGS)

label-export: | setup
	$(PY) -m stages.label.export --config configs/label.yaml --run $(RUN) $(ARGS)

# Simulated annotators label the pairs through the label store people use (stages/simulate.py); like
# label-export it always runs, adding labels only for pairs it has not labeled yet.
simulate: $(RUNDIR)/pairs/manifest.json
	$(PY) -m stages.simulate --config $(call cfg,simulate) --run $(RUN) $(ARGS)

# Story recipe: the reward model learns from this run's own labels. When people have labeled (make label), theirs
# are exported; otherwise simulated annotators label the pairs first, so `make sft rm ppo` runs unattended.
ifeq ($(RECIPE),story)
$(RUNDIR)/rm/manifest.json: $(RUNDIR)/label-export/manifest.json
endif
$(RUNDIR)/label-export/manifest.json: $(RUNDIR)/pairs/manifest.json
	$(PY) -m stages.simulate --config $(call cfg,simulate) --run $(RUN) --skip_if_people_labeled true
	$(PY) -m stages.label.export --config $(call cfg,label) --run $(RUN)

eval: $(RUNDIR)/eval/manifest.json
$(RUNDIR)/eval/manifest.json: $(RUNDIR)/ppo/manifest.json
	$(LAUNCH) stages.eval --config $(call cfg,eval) --run $(RUN) $(MODEL_ARG) $(ARGS)

publish: $(RUNDIR)/eval/manifest.json
	$(PY) -m stages.publish --config configs/publish.yaml --run $(RUN) $(if $(REPO),--repo_id $(REPO)) $(ARGS)

bench: bench-sft bench-ppo
bench-sft: setup
	$(PY) -m bench.bench_sft
bench-ppo: setup
	$(PY) -m bench.bench_ppo
