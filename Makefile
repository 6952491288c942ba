# The whole pipeline, one target a stage. `make sft rm ppo` runs what is not yet done:
# each stage target depends on its manifest, written last, so a finished stage is not rerun.
RUN ?= default
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

.PHONY: setup test base sft rm ppo pairs label label-export eval publish bench bench-sft bench-ppo clean-run

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
	$(LAUNCH) stages.sft --config configs/sft.yaml --run $(RUN) $(MODEL_ARG) $(ARGS)

clean-run:
	rm -rf $(RUNDIR)

rm: $(RUNDIR)/rm/manifest.json
$(RUNDIR)/rm/manifest.json: $(RUNDIR)/sft/manifest.json
	$(LAUNCH) stages.rm --config configs/rm.yaml --run $(RUN) $(MODEL_ARG) $(ARGS)

ppo: $(RUNDIR)/ppo/manifest.json
$(RUNDIR)/ppo/manifest.json: $(RUNDIR)/sft/manifest.json $(RUNDIR)/rm/manifest.json
	$(LAUNCH) stages.ppo --config configs/ppo.yaml --run $(RUN) $(MODEL_ARG) $(ARGS)

# DPO straight from the SFT policy on the reward model's preference data (no reward model, no PPO).
.PHONY: dpo
dpo: $(RUNDIR)/dpo/manifest.json
$(RUNDIR)/dpo/manifest.json: $(RUNDIR)/sft/manifest.json
	$(LAUNCH) stages.dpo --config configs/dpo.yaml --run $(RUN) $(MODEL_ARG) $(ARGS)

pairs: $(RUNDIR)/pairs/manifest.json
$(RUNDIR)/pairs/manifest.json: $(RUNDIR)/sft/manifest.json
	$(LAUNCH) stages.pairs --config configs/pairs.yaml --run $(RUN) $(MODEL_ARG) $(ARGS)

# The labeling UI is a server, not a batch job: it always runs (and resumes from the label store).
# With ARGS="--pairs_dataset FILE" (e.g. eval's human_pairs.jsonl) it needs no pairs stage.
label: $(if $(findstring --pairs_dataset,$(ARGS)),,$(RUNDIR)/pairs/manifest.json)
	$(PY) -m stages.label --config configs/label.yaml --run $(RUN) $(ARGS)

label-export: | setup
	$(PY) -m stages.label.export --config configs/label.yaml --run $(RUN) $(ARGS)

eval: $(RUNDIR)/eval/manifest.json
$(RUNDIR)/eval/manifest.json: $(RUNDIR)/ppo/manifest.json
	$(LAUNCH) stages.eval --config configs/eval.yaml --run $(RUN) $(MODEL_ARG) $(ARGS)

publish: $(RUNDIR)/eval/manifest.json
	$(PY) -m stages.publish --config configs/publish.yaml --run $(RUN) $(if $(REPO),--repo_id $(REPO)) $(ARGS)

bench: bench-sft bench-ppo
bench-sft: setup
	$(PY) -m bench.bench_sft
bench-ppo: setup
	$(PY) -m bench.bench_ppo
