# The whole pipeline, one target a stage. `make sft rm ppo` runs what is not done yet or no longer current: a stage's
# manifest records what it read (command line, accelerate config, config and data files, upstream manifests), and
# pipeline.launch skips a stage whose inputs are all unchanged (one "up to date" line). FORCE=1 redoes the stages you
# name.
# RECIPE picks the stage configs: story (default; configs/<stage>.yaml) or a folder of configs/recipes/, e.g.
# RECIPE=assistant (configs/recipes/assistant/<stage>.yaml). A recipe other than story gets its own run folder.
RECIPE ?= story
# Bad make variables get what bad stage input gets: one `error:` line on stderr, exit 2 (make adds "*** stopped").
refuse = $(file >/dev/stderr,error: $(1))$(error stopped)
RECIPE_DIR := $(if $(filter story,$(RECIPE)),configs,configs/recipes/$(RECIPE))
$(if $(wildcard $(RECIPE_DIR)/*.yaml),,$(call refuse,RECIPE=$(RECIPE): no configs in $(RECIPE_DIR); use story or one of: $(notdir $(wildcard configs/recipes/*))))
cfg = $(firstword $(wildcard $(RECIPE_DIR)/$(1).yaml) configs/$(1).yaml)
RUN ?= $(if $(filter story,$(RECIPE)),default,$(RECIPE))
RUNS_DIR ?= runs
# A run is one folder under RUNS_DIR, so that no stage writes, and `make clean-run` deletes, anything outside it; and
# nothing in its name that the recipes' shell would read (RUN=x;cmd would run cmd).
RUN_CHARS := a b c d e f g h i j k l m n o p q r s t u v w x y z A B C D E F G H I J K L M N O P Q R S T U V W X Y Z \
	0 1 2 3 4 5 6 7 8 9 . _ -
drop_chars = $(if $(2),$(call drop_chars,$(subst $(firstword $(2)),,$(1)),$(wordlist 2,$(words $(2)),$(2))),$(1))
RUN_PROBLEM := $(if $(filter-out 1,$(words $(RUN))),is not one word,$(if $(or $(findstring /,$(RUN)),$(findstring \,$(RUN))),holds a path separator,$(if $(filter . ..,$(RUN)),is not a folder name,$(if $(call drop_chars,$(RUN),$(RUN_CHARS)),holds other characters,$(if $(filter -% .%,$(RUN)),does not start with a letter or digit)))))
$(if $(RUN_PROBLEM),$(call refuse,RUN=$(RUN) $(RUN_PROBLEM): name the run with letters digits . _ - only (e.g. RUN=mine)))
# RUNS_DIR goes into the same shell lines (and `make clean-run`'s rm -rf): a path of those characters and / only.
RUNS_DIR_PROBLEM := $(if $(filter-out 1,$(words $(RUNS_DIR))),is not one word,$(if $(call drop_chars,$(RUNS_DIR),$(RUN_CHARS) /),holds other characters))
$(if $(RUNS_DIR_PROBLEM),$(call refuse,RUNS_DIR=$(RUNS_DIR) $(RUNS_DIR_PROBLEM): give a folder path of letters digits . _ - / only))
# Story recipe: the reward model learns from this run's own labels. When people have labeled (make label), theirs are
# exported; otherwise simulated annotators label the pairs first (stages/simulate.py), so `make sft rm ppo` runs
# unattended. AUTO_LABELS= (empty) turns that off: rm then reads whatever label export the run has.
AUTO_LABELS ?= $(if $(filter story,$(RECIPE)),1)
ACCELERATE_CONFIG ?= configs/accelerate/cpu.yaml
ARGS ?=
MODEL ?=
MODEL_ARG := $(if $(MODEL),--model_config $(MODEL))
PY ?= .venv/bin/python
RUNDIR := $(RUNS_DIR)/$(RUN)
# The stage modules. Tests run this Makefile on fast fake stages (tests/fake_stages/).
STAGE_PKG ?= stages
# CPU threads per process: the machine's cores shared out among the accelerate config's processes (cpu.yaml: one
# process gets them all; cpu2.yaml: half each). PASSIVE: a waiting thread sleeps instead of spinning, so a busy
# neighbour costs no more than with one thread. Measured on 2 cores: `make sft rm ppo` 667 s with 1 thread, 446 s
# with 2; SFT, 40 steps beside a process holding one core: 43.5 s with 1 thread, 65.4 s with 2 spinning, 42.4 s with
# 2 passive (quiet: 36.7 s, 27.5 s, 28.7 s). Set OMP_NUM_THREADS=1 to keep one core free for something else.
# The machine's cores, not the caller's OMP_NUM_THREADS (which nproc would report): that is read on its own below.
CPU_COUNT := $(shell env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1)
processes_of = $(or $(shell sed -n 's/^num_processes: *\([0-9][0-9]*\).*/\1/p' $(1) 2>/dev/null),1)
threads_for = $(shell n=$$(( $(CPU_COUNT) / $(1) )); [ $$n -ge 1 ] && echo $$n || echo 1)
THREADS_FROM_CALLER := $(filter environment% command%,$(origin OMP_NUM_THREADS))
export OMP_NUM_THREADS ?= $(call threads_for,$(call processes_of,$(ACCELERATE_CONFIG)))
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE ?= 1
export GRADIO_ANALYTICS_ENABLED ?= False
# Gradio's run history pages call the Hub with your token for clients that have not logged in
export GRADIO_RUN_HISTORY ?= False
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false
# torch's c10d logs a warning on stderr when it cannot look up the name of a rank's address (a machine with no
# DNS): a two-process CPU stage's Ctrl-C or bad input was then two lines, not one. Its errors still print. Only under
# the CPU configs: on GPUs its warnings are the hints a hang needs (NCCL's "using GPU N ... device unknown", a
# process group not destroyed, TCPStore's connect retries of a node that cannot reach the main one).
ifneq (,$(findstring cpu,$(notdir $(ACCELERATE_CONFIG))))
export TORCH_CPP_LOG_LEVEL ?= ERROR
endif
# Progress bars into a log (make ... 2>&1 | tee log, CI): tqdm redraws each bar up to ten times a second, and a log
# keeps every redraw (80% of a default run's log). There, one redraw each 10 s (and the last); a terminal as tqdm has it.
ifeq (,$(TQDM_MININTERVAL)$(shell [ -t 2 ] && echo terminal))
export TQDM_MININTERVAL = 10
endif

# Two CPU processes: accelerate's multi-GPU launcher with every rank on the CPU (configs/accelerate/cpu2.yaml).
ifneq (,$(findstring cpu2.yaml,$(ACCELERATE_CONFIG)))
export ACCELERATE_USE_CPU = 1
endif
# The sampling stages (`make pairs`, `make eval`) on the CPU default: two processes of one thread each (cpu2.yaml).
# Sampling is a chain of small steps that a second thread barely speeds up; two processes split its batches, and
# every batch has its own seed, so the pairs and the eval report are the same, byte for byte (tests/test_pairs.py,
# tests/test_sharding.py; the launch line: tests/test_make.py). Measured on 2 cores, the default run: pairs 139 s in
# one process of 2 threads, 79 s in two of one thread; eval 77 s and 54 s. Any other ACCELERATE_CONFIG samples under
# itself; SAMPLING_ACCELERATE_CONFIG=configs/accelerate/cpu.yaml keeps one process.
# The caller's OMP_NUM_THREADS=1, in the environment or on the command line, is one core: one process.
SAMPLING_CORES := $(if $(THREADS_FROM_CALLER),$(OMP_NUM_THREADS),$(CPU_COUNT))
SAMPLING_ACCELERATE_CONFIG ?= $(if $(and $(filter configs/accelerate/cpu.yaml,$(ACCELERATE_CONFIG)),$(filter-out 0 1,$(SAMPLING_CORES))),configs/accelerate/cpu2.yaml,$(ACCELERATE_CONFIG))
stage_config = $(if $(filter pairs eval,$(1)),$(SAMPLING_ACCELERATE_CONFIG),$(ACCELERATE_CONFIG))
# A stage under another config than ACCELERATE_CONFIG: that config's threads a process (unless the caller set
# OMP_NUM_THREADS), and CPU ranks for cpu2.yaml.
stage_env = $(if $(filter-out $(ACCELERATE_CONFIG),$(call stage_config,$(1))),env \
	$(if $(findstring cpu2.yaml,$(call stage_config,$(1))),ACCELERATE_USE_CPU=1) \
	$(if $(THREADS_FROM_CALLER),,OMP_NUM_THREADS=$(call threads_for,$(call processes_of,$(call stage_config,$(1))))))

# ARGS go to the one stage you name (`make rm ARGS=...`); every stage, named or reached through a chain, also gets
# its own variable: `make sft rm ppo SFT_ARGS="--max_steps 50" PPO_ARGS="--total_updates 20"`.
SFT_ARGS ?=
RM_ARGS ?=
PPO_ARGS ?=
PAIRS_ARGS ?=
EVAL_ARGS ?=
GRPO_ARGS ?=
RLOO_ARGS ?=
REINFORCE_PP_ARGS ?=
DPO_ARGS ?=
SIMULATE_ARGS ?=
NAMED := $(filter base sft rm ppo grpo rloo reinforce_pp dpo pairs label label-export simulate eval publish,$(MAKECMDGOALS))
ifneq (,$(and $(strip $(ARGS)),$(word 2,$(NAMED))))
ARGS_TO_EVERY_STAGE := ARGS="$(ARGS)" would go to every one of $(NAMED): name one stage, or use SFT_ARGS, RM_ARGS, PPO_ARGS, GRPO_ARGS, RLOO_ARGS, REINFORCE_PP_ARGS, DPO_ARGS, PAIRS_ARGS, SIMULATE_ARGS, EVAL_ARGS
$(call refuse,$(ARGS_TO_EVERY_STAGE))
endif
# Every stage once: NAME:MODULE:CONFIG:ARGS-VARIABLE:MODEL. CONFIG is read through the recipe ($(call cfg,CONFIG)); "-"
# means no ARGS variable of its own (ARGS only when the stage is named), "model" that MODEL= applies. The check below
# and the stage rules both read this table, so what is checked is what runs.
STAGES := sft:sft:sft:SFT_ARGS:model pairs:pairs:pairs:PAIRS_ARGS:model simulate:simulate:simulate:SIMULATE_ARGS:- \
	rm:rm:rm:RM_ARGS:model ppo:ppo:ppo:PPO_ARGS:model grpo:ppo:grpo:GRPO_ARGS:model rloo:ppo:rloo:RLOO_ARGS:model \
	reinforce_pp:ppo:reinforce_pp:REINFORCE_PP_ARGS:model dpo:dpo:dpo:DPO_ARGS:model eval:eval:eval:EVAL_ARGS:model \
	label:label:label:-:- label-export:label.export:label:-:- publish:publish:publish:PUBLISH_REPO:-
PUBLISH_REPO = $(if $(and $(REPO),$(filter publish,$(NAMED))),--repo_id $(REPO))
$(if $(filter-out 0 1,$(words $(REPO))),$(call refuse,REPO=$(REPO) is not one word: give the Hub repo id as user/name))
# REPO, MODEL and ACCELERATE_CONFIG go into the shell lines too, as RUN does: letters digits . _ - / only (REPO='me/x;cmd'
# ran cmd, even under make -n, and its exit status answered make's check).
$(foreach v,REPO MODEL ACCELERATE_CONFIG,$(if $(call drop_chars,$($(v)),$(RUN_CHARS) /),$(call refuse,$(v)=$($(v)) holds other characters than letters digits . _ - /: $(if $(filter REPO,$(v)),give the Hub repo id as user/name,give the path of a file of such a name))))
stage_field = $(word $(2),$(subst :, ,$(filter $(1):%,$(STAGES))))
# What a stage is given: its module, config, MODEL_ARG where it takes one, its own variable and ARGS when named.
stage_opts = -m $(STAGE_PKG).$(call stage_field,$(1),2) --config $(call cfg,$(call stage_field,$(1),3)) --run $(RUN) \
	--runs_dir $(RUNS_DIR) $(if $(filter model,$(call stage_field,$(1),5)),$(MODEL_ARG)) $(call variant_base,$(1))
# A recipe without its own grpo/rloo/reinforce_pp.yaml: configs/<estimator>.yaml's keys over the recipe's ppo.yaml (its
# prompts, lengths, held-out share), not over the story's (they trained on story openings beside the recipe's PPO).
variant_base = $(if $(and $(filter grpo rloo reinforce_pp,$(1)),$(filter-out story,$(RECIPE)),$(if $(wildcard $(RECIPE_DIR)/$(1).yaml),,1)),--base_config $(call cfg,ppo))
stage_args = $($(call stage_field,$(1),4)) $(if $(filter $(1),$(NAMED)),$(ARGS))
# Every stage named on the command line and every stage given flags is parsed before any stage runs (pipeline.launch
# --check: its YAML, unknown flags, types, ranges, dataset paths; publish's repo), all in one process (the imports once,
# ~2 s), so a bad flag in PPO_ARGS, a typo in a recipe's ppo.yaml or an fp16 ACCELERATE_CONFIG for a named RL stage is one
# error line at once, not after SFT and the reward models have trained. A stage that runs only as another's
# prerequisite is checked when it starts. Once .venv exists.
stage_names := $(foreach s,$(STAGES),$(firstword $(subst :, ,$(s))))
# `make eval` or `make publish` brings the run's RL policies up to date first (PPO when it has none: the eval rule
# below), under the same ACCELERATE_CONFIG: they are checked too.
RL_OF_RUN := $(foreach s,ppo grpo rloo reinforce_pp,$(if $(wildcard $(RUNDIR)/$(s)/manifest.json),$(s)))
# `make publish ARGS="--policy grpo"` publishes a policy the run may not have yet: it is brought up to date (eval compares
# it) as a named stage is; it had run the chain to PPO's eval and then refused.
word_after = $(if $(word 2,$(2)),$(if $(filter $(1),$(firstword $(2))),$(word 2,$(2)),$(call word_after,$(1),$(wordlist 2,$(words $(2)),$(2)))))
PUBLISH_POLICY := $(if $(filter publish,$(NAMED)),$(lastword $(call word_after,--policy,$(ARGS)) $(patsubst --policy=%,%,$(filter --policy=%,$(ARGS)))))
RL_FOR_EVAL := $(if $(filter eval publish,$(NAMED)),$(or $(strip $(RL_OF_RUN) $(filter ppo grpo rloo reinforce_pp,$(NAMED) $(PUBLISH_POLICY))),ppo))
CHECKED := $(foreach s,$(stage_names),$(if $(or $(filter $(s),$(NAMED) $(RL_FOR_EVAL)),$(strip $(call stage_args,$(s)))),$(s)))
ifneq (,$(and $(CHECKED),$(wildcard $(PY))))
checked := $(shell PIPELINE_ACCELERATE_CONFIG=$(ACCELERATE_CONFIG) $(PY) -m pipeline.launch --check $(foreach s,$(CHECKED),:: $(s) $(call stage_opts,$(s)) $(call stage_args,$(s))))
ifneq (0,$(.SHELLSTATUS))
$(error stopped)
endif
endif
# $(call stage,NAME): run one stage under accelerate unless its manifest is current.
stage = $(call stage_env,$(1)) $(PY) -m pipeline.launch $(1) $(if $(and $(FORCE),$(filter $(1),$(NAMED))),--force) \
	$(if $(filter $(1),$(NAMED)),,--chained) --config_file $(call stage_config,$(1)) $(call stage_opts,$(1)) $(call stage_args,$(1))
# $(call direct,NAME): a stage that runs in this process, not under accelerate (the labeling server, exports, publish).
direct = $(PY) $(call stage_opts,$(1)) $(call stage_args,$(1))

.PHONY: setup test base sft rm ppo grpo rloo reinforce_pp dpo pairs label label-export simulate labels eval publish bench bench-sft \
	bench-ppo bench-rl bench-rm bench-rm-limit bench-rm-prefix bench-dpo-prefix bench-rm-ceiling bench-valence-probe bench-story bench-estimators bench-shard bench-label mutants clean-run

setup: .venv/.done
.venv/.done: pyproject.toml constraints.txt
	test -d .venv || python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	# torch first and pinned, so that the wheel pip's configuration offers for 2.13.0 is the one taken (a local CPU
	# wheel on our CI machines; from PyPI on Linux x86_64 the CUDA build, for GPUs). Left free, the packages after it
	# would pull another torch: a multi-GB CUDA build on a CPU machine.
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# One thread per test process: the suite starts many processes, some of them two at once. Two pytest workers (one per
# core of the 2-core CI machine), each taking whole files (their module fixtures are built once): 12.6 minutes against
# 21.7 for one worker, on the same machine. The files start in tests/conftest.py's order (the longest, test_journey.py,
# first: xdist's own order started it last).
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25 tests

base: setup
	$(PY) -m stages.base --config configs/base.yaml --run $(RUN) --runs_dir $(RUNS_DIR) $(ARGS)

sft: | setup
	$(call stage,sft)

# Not under a stage that runs in it (its launch holds the stage's lock): it would write on into a folder now gone.
clean-run:
	@if [ -x $(PY) ]; then $(PY) -m pipeline.launch --refuse_if_running $(RUNDIR); fi
	rm -rf $(RUNDIR)

# The run's labels are brought up to date first, unless the stage is given its own preferences (--dataset_name, or a
# --dataset_mixture that leaves out label-export; an empty one, {}, is DPO's "rm_config's mixture", which holds it),
# which replace the label export: sampling and labeling pairs it would not read is minutes of work, hours on a real
# model.
mixture_of_own = $(and $(filter --dataset_mixture --dataset_mixture=%,$(1)),\
	$(if $(or $(findstring label-export,$(1)),$(findstring {},$(1))),,1))
own_preferences = $(or $(filter --dataset_name --dataset_name=%,$(1)),$(mixture_of_own))
labels_for = $(if $(and $(AUTO_LABELS),$(if $(call own_preferences,$(call stage_args,$(1))),,1)),labels)
rm: sft $(call labels_for,rm)
	$(call stage,rm)

ppo: sft rm
	$(call stage,ppo)

# The critic-free estimators: the same RL loop (stages/ppo/) with configs/grpo.yaml, rloo.yaml or reinforce_pp.yaml,
# each in its own run folder.
grpo: sft rm
	$(call stage,grpo)

rloo: sft rm
	$(call stage,rloo)

reinforce_pp: sft rm
	$(call stage,reinforce_pp)

pairs: sft
	$(call stage,pairs)

# DPO straight from the SFT policy on the reward model's preference data (no reward model, no PPO).
dpo: sft $(call labels_for,dpo)
	$(call stage,dpo)

# A run whose people label pairs of their own (`make label ARGS="--pairs_dataset FILE"` in a run that has sampled
# none: the label stage records FILE in label/own_pairs.txt; eval's SFT-vs-PPO pairs never).
OWN_PAIRS_FILE := $(if $(wildcard $(RUNDIR)/pairs/manifest.json),,$(wildcard $(RUNDIR)/label/own_pairs.txt))
# The labeling UI is a server, not a batch job: it always runs (and resumes from the label store).
# With ARGS="--pairs_dataset FILE" (e.g. eval's human_pairs.jsonl) it needs no pairs stage, nor in a run of your own
# pairs (OWN_PAIRS_FILE): it serves them again.
label: $(if $(or $(findstring --pairs_dataset,$(ARGS)),$(OWN_PAIRS_FILE)),,pairs)
	$(call direct,label)

# Always exports when asked (the labels may have changed); the reward model and PPO then retrain on the next make.
label-export: | setup
	$(call direct,label-export)

# Simulated annotators label the pairs through the label store people use (stages/simulate.py); like label-export it
# always runs when named. The store then holds the labels of these settings (unchanged ones are not rewritten), and
# the next `make rm` exports them and retrains.
simulate: pairs
	$(call direct,simulate)

# The story chain's labels, when the export no longer holds the run's pairs and the store's labels
# (stages/label/fresh_export.py): new pairs (or no export yet, or a file simulate read changed since it drew the
# export's labels; other flags than it ran with are an error, as for a stage reached through the chain) are simulated
# first (unless people labeled them); a
# changed store (people labeled with `make label`, or a `make simulate` rerun) or label config is
# exported again as it was last exported (--refresh), so the reward model retrains on it. A change that leaves the
# export's rows as they were (labels of eval's pairs, a skip) leaves the run current.
# A run whose people label pairs of their own (OWN_PAIRS_FILE, above): its labels are those pairs', exported from that
# file, and no pairs are sampled. The step sampled the bundled prompts' pairs there and
# simulated their labels, which replaced people's in the export.
SIMULATE_FLAGS = $(wordlist 3,9999,$(call stage_opts,simulate)) --skip_if_people_labeled true $(SIMULATE_ARGS)
labels: $(if $(OWN_PAIRS_FILE),,pairs)
	@$(PY) -m stages.label.fresh_export $(RUNDIR) $(if $(OWN_PAIRS_FILE),,-- $(SIMULATE_FLAGS)); fresh=$$?; \
	if [ -n "$(OWN_PAIRS_FILE)" ] && { [ $$fresh = 4 ] || [ $$fresh = 3 ]; }; then \
	  echo "labels: exporting people's labels of your own pairs ($$(cat $(OWN_PAIRS_FILE)); no pairs are sampled)" && \
	  $(PY) $(call stage_opts,label-export) --pairs_dataset "$$(cat $(OWN_PAIRS_FILE))"; \
	elif [ $$fresh = 4 ]; then \
	  $(PY) -m $(STAGE_PKG).simulate $(SIMULATE_FLAGS) && \
	  $(PY) $(call stage_opts,label-export) --refresh true; \
	elif [ $$fresh = 3 ]; then echo "labels: the label store or the label config changed since the last export: exporting" && \
	  $(PY) $(call stage_opts,label-export) --refresh true; \
	elif [ $$fresh = 0 ]; then echo "labels: up to date, skipped (the export holds the run's pairs and the store's labels)"; \
	else exit $$fresh; fi

# eval compares every policy the run has (each brought up to date first). Its held-out prompts are those an RL stage
# set aside: a run with no RL policy (none, or DPO alone) trains PPO first. It scores with the reward models too, which
# every RL stage brings up to date first (a DPO-only run had not). A policy stage named beside eval (`make grpo eval`
# on a fresh run) is one it evaluates, and PPO is then not trained.
EVAL_POLICIES := $(strip $(foreach s,ppo grpo rloo reinforce_pp dpo,$(if $(or $(wildcard $(RUNDIR)/$(s)/manifest.json),$(filter $(s),$(MAKECMDGOALS) $(PUBLISH_POLICY))),$(s))))
eval: $(if $(filter-out dpo,$(EVAL_POLICIES)),,ppo) $(EVAL_POLICIES)
	$(call stage,eval)

publish: eval
	$(call direct,publish)

# The peer benchmarks run one thread per process on both sides (as their recorded results); bench-story measures the
# default run as a user gets it, with the threads above.
bench: bench-sft bench-ppo bench-rl bench-rm
bench-sft: setup
	OMP_NUM_THREADS=1 $(PY) -m bench.bench_sft
bench-ppo: setup
	OMP_NUM_THREADS=1 $(PY) -m bench.bench_ppo
# GRPO and RLOO (stages/ppo) against TRL 1.16's GRPOTrainer and RLOOTrainer on the story task: bench/results/rl.json.
bench-rl: setup
	OMP_NUM_THREADS=1 $(PY) -m bench.bench_rl
bench-rm: setup
	OMP_NUM_THREADS=1 $(PY) -m bench.rm_rules
# What limits the reward model's agreement with the gold (labels, seeds, ensemble, noise-free labels, half the data),
# on the run's pairs and labels (RUN=, default: the default run): bench/results/rm_limit.json. Needs `make sft rm` first.
bench-rm-limit: setup
	OMP_NUM_THREADS=1 $(PY) -m bench.rm_limit --from_run $(RUNDIR) $(ARGS)
# What running a prompt's shared tokens once (share_prefix in configs/rm.yaml) saves the reward model, on the default
# run's labels: bench/results/rm_prefix.json. Needs `make sft rm` first.
bench-rm-prefix: setup
	OMP_NUM_THREADS=1 $(PY) -m bench.shared_prefix --stage rm --from_run $(RUNDIR) $(ARGS)
# DPO's policy trained on the run's labels with and without shared prefixes, alternating, timed:
# bench/results/dpo_prefix.json. Needs `make sft rm` first.
bench-dpo-prefix: setup
	OMP_NUM_THREADS=1 $(PY) -m bench.shared_prefix --stage dpo --from_run $(RUNDIR) $(ARGS)
# Does the base know which words are happy? A linear probe of its layers for VADER's word valences (seconds):
# bench/results/valence_probe.json.
bench-valence-probe: setup
	OMP_NUM_THREADS=1 $(PY) -m bench.valence_probe
# How much can the run's labels teach? Bag-of-words learners on the reward model's own held-out pairs, knowing no word
# or told VADER's words, on the labels and noise-free (about 2 minutes): bench/results/rm_ceiling.json.
bench-rm-ceiling: setup
	OMP_NUM_THREADS=1 $(PY) -m bench.rm_ceiling --from_run $(RUNDIR) $(ARGS)
# The default story run under seeds 1-3 (make sft rm ppo eval each): gold gain, win rate, wall time -> bench/results/story.json
bench-story: setup
	$(PY) -m bench.story_seeds
# PPO, GRPO, RLOO, REINFORCE++ and DPO on one run's SFT policy and reward models, each made in turn, then one make eval
# (SEEDS=, default 42: the default run; another seed s is RUN=seed-<s>, every stage seeded): each one's gold gain, gold
# win rate over SFT, KL and wall time -> bench/results/estimators.json (seed 42 there: 23 minutes on 2 cores beside
# other work, its make calls' wall times summed; DPO alone 10.5)
SEEDS ?= 42
bench-estimators: setup
	$(PY) -m bench.estimators --seeds $(SEEDS) --runs_dir $(RUNS_DIR)
# PPO's frozen base loaded sharded (FSDP2) against data parallel, two CPU processes each, on a random-init 163M Llama:
# each rank's peak memory, episodes/s and that both give the same figures (about 10 minutes): bench/results/shard.json
bench-shard: setup
	$(PY) -m bench.bench_shard
# The labeling app on a big store: one click, the next pair and the Stats view at 5,000 and 50,000 pairs (about a
# minute): bench/results/label_store.json
bench-label: setup
	OMP_NUM_THREADS=1 $(PY) -m bench.label_store $(ARGS)
# Does the suite catch a broken rule? Hand-made mutants of the arithmetic, each against its tests (tools/mutants.py):
# bench/results/mutants.json, exit 1 naming any mutant the tests pass.
mutants: setup
	$(PY) -m tools.mutants
