# Every experiment of the paper is one command; see README.md ("Reproducing the paper").
#   make xgqa-suf MODEL=cclm NPROC=4 DATA=~/iglue IMAGES=~/images CKPT=~/cclm_x2vlm_base.th
# Variables: MODEL=uc2|cclm, NPROC (torchrun processes), DATA (folder holding datasets/),
# FEATURES (UC2 region-feature LMDB folder), IMAGES (CCLM image folder), CKPT (pre-trained
# checkpoint), TOKENIZER (xlm-roberta-base folder or cached hub id), OUT (runs folder),
# EXTRA (more options for the command a target runs), PY (your own Python environment instead of
# .venv: `make test PY=python3` uses it as it is, installs nothing).
PYTHON    ?= python3
VENV      ?= .venv
PY        ?= $(VENV)/bin/python
# the venv is installed only when PY is ours
INSTALL   := $(if $(filter file,$(origin PY)),install)
MODEL     ?= uc2
NPROC     ?= 1
DATA      ?= data/iglue
FEATURES  ?= data/features
IMAGES    ?= data/images
CKPT      ?= checkpoints/$(MODEL)_pretrained
TOKENIZER ?= xlm-roberta-base
OUT       ?= runs
RUN       ?=
CKPT_FT   ?= checkpoints/uc2_iglue_xgqa/pytorch_model_best.bin
EXTRA     ?=
LANG_FS   ?= de
SHOTS     ?= 48
TEST_WORKERS ?= auto
# languages xFlickrCo evaluates after each epoch (all-pairs retrieval is costly); empty: every language.
# The last epoch always evaluates every language (docs/choices.md).
XFLICKRCO_EPOCH_LANGS ?= en

ifeq ($(NPROC),1)
LAUNCH := $(PY)
else
LAUNCH := $(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC)
endif

# what each model reads besides the annotations
ifeq ($(MODEL),uc2)
VISUAL_ARG := --features $(FEATURES)
VISUAL     := $(FEATURES)
else ifeq ($(MODEL),cclm)
VISUAL_ARG := --images $(IMAGES)
VISUAL     := $(IMAGES)
else
$(error MODEL must be uc2 or cclm, not '$(MODEL)')
endif

COMMON = --data-root $(DATA) $(VISUAL_ARG) --checkpoint $(CKPT) --tokenizer $(TOKENIZER)
# Fails before any training starts, naming every missing input (and a missing Python).
require = @missing=""; for p in $(1); do [ -e "$$p" ] || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "error: missing input(s):$$missing (set DATA=, FEATURES=, IMAGES=, CKPT=, TOKENIZER= or RUN=; see README)" >&2; exit 2; fi; \
	command -v $(PY) >/dev/null 2>&1 || { echo "error: no Python at $(PY): run 'make install', or use your own environment with PY= (e.g. PY=python3)" >&2; exit 2; }
# Evaluating RUN=: the run's own inputs (its args.json), each replaced only where given (make eval RUN=r DATA=d).
given = $(if $(filter command line environment override,$(origin $(1))),$(2))
RUN_INPUTS = $(call given,DATA,--data-root $(DATA)) $(call given,FEATURES,--features $(FEATURES)) \
	$(call given,IMAGES,--images $(IMAGES)) $(call given,TOKENIZER,--tokenizer $(TOKENIZER))
need_run = @[ -n "$(RUN)" ] || { echo "error: RUN= names the run folder to evaluate (e.g. RUN=runs/uc2-xgqa-suf)" >&2; exit 2; }
RUN_PATHS = $(RUN) $(call given,DATA,$(DATA)/datasets) $(call given,FEATURES,$(FEATURES)) $(call given,IMAGES,$(IMAGES))
INPUTS = $(DATA)/datasets $(VISUAL) $(CKPT)

.PHONY: install test test-unit test-system demo bench help synth synth-small synth-study1 synth-world synth-pretrain synth-xvlmaml table1 figures eval translate-test sanity \
	xgqa-full xgqa-suf xvnli-full xvnli-suf xflickrco-full xflickrco-suf marvl-full marvl-suf \
	xgqa-llrd-sweep xgqa-llrd-0.98 xgqa-llrd-0.95 xgqa-llrd-0.88 xgqa-llrd-0.75 xgqa-top6 \
	fewshot-xgqa-full fewshot-xgqa-suf fewshot-marvl-full fewshot-marvl-suf translate-test-marvl-full translate-test-marvl-suf

# `make help`: the paper's experiments first, then the comparison systems, then the rest (tests, benches, ...).
HELP_LINES = grep -hE '^\#\# ' $(1) | grep -v '\$$(' | sed 's/^\#\# /  /'
HELP_PAPER = '^  (xgqa-llrd-sweep|xgqa-top6|eval|translate-test|sanity|table1|figures) '
help:
	@echo "The paper's experiments (README \"Running the real experiment\"):"
	@echo "  {xgqa,xvnli,xflickrco}-{full,suf}  train MODEL= on English with the policy, evaluate after every epoch (xflickrco: English; every language at the end)"
	@echo "  fewshot-xgqa-{full,suf}  continue OUT/MODEL-xgqa-<policy> on LANG_FS=<lang>'s SHOTS=48-shot split"
	@$(call HELP_LINES,Makefile) | grep -E $(HELP_PAPER)
	@echo "MaRVL, IGLUE's fourth task (not in the paper; docs/reproducing.md#marvl):"
	@echo "  marvl-{full,suf}  train MODEL= on English NLVR2 with the policy, evaluate en (NLVR2 test) and id sw ta tr zh after every epoch"
	@echo "  translate-test-marvl-{full,suf}  OUT/MODEL-marvl-<policy> on MaRVL's machine-translated test files"
	@echo "  fewshot-marvl-{full,suf}  continue OUT/MODEL-marvl-<policy> on LANG_FS=id|tr|zh's SHOTS=1|2|4|10|10x2 split (default id, 10x2)"
	@echo "The comparison systems (docs/xvlmaml.md, docs/mclip.md):"
	@$(call HELP_LINES,Makefile comparisons/mclip/mclip.mk) | grep -E '^  (xvlmaml-|pet-|synth-mclip)'
	@echo "Tests, benchmarks, the synthetic world:"
	@$(call HELP_LINES,Makefile) | grep -vE $(HELP_PAPER) | grep -vE '^  xvlmaml-'

install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

## test            the whole test suite (CPU, tiny models, shipped fixtures)
# pytest-xdist (requirements.txt) spreads test files over TEST_WORKERS processes (auto: one per CPU, at most 4);
# TEST_WORKERS=0 runs in one process. An environment without xdist (PY=) runs in one process.
# Time limits scale with SUF_TEST_TIMEOUT_SCALE (default 1) and with the load per core (tests/_timeouts.py).
XDIST = $$($(PY) -c "import xdist" 2>/dev/null && echo "-n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile")
test: $(INSTALL)
	$(PY) -m pytest -q $(XDIST) tests $(EXTRA)

## test-unit       the fast in-process tests alone (pytest -m "not system")
test-unit: $(INSTALL)
	$(PY) -m pytest -q $(XDIST) -m "not system" tests $(EXTRA)

## test-system     the tests that start processes alone: torchrun, SIGKILL, make, CLIs (pytest -m system)
test-system: $(INSTALL)
	$(PY) -m pytest -q $(XDIST) -m system tests $(EXTRA)

## demo            SUF vs standard fine-tuning of a small pretrained UC2 in the synthetic world (docs/synthetic/results.md)
demo: $(INSTALL)
	$(PY) -m synthetic.demo --out demo_out $(EXTRA)

# ---- the synthetic multilingual world (docs/synthetic/protocol.md) ----
SYNTH ?= synth_out
## synth-world     write the synthetic world (IGLUE layout, features, tokenizer) to SYNTH=synth_out/world
synth-world: $(INSTALL)
	$(PY) -m synthetic.world --out $(SYNTH)/world
## synth-pretrain  regenerate the shipped world checkpoint tests/fixtures/synth/pretrain_seed0.bin (one core)
synth-pretrain: $(INSTALL)
	@[ -e $(SYNTH)/world/world.json ] || $(PY) -m synthetic.world --out $(SYNTH)/world
	$(PY) -m synthetic.pretrain --world $(SYNTH)/world --seed 0 --steps 3000 --eval-every 300 --out tests/fixtures/synth/pretrain_seed0.bin
## synth           Study 3, the whole design (docs/synthetic/protocol_study3.md; ~2 h 40 min estimated, 2 cores)
synth: $(INSTALL)
	$(PY) -m synthetic.study3 --out $(SYNTH) --record
## synth-small     Study 3 at its smallest: 2 pretraining seeds x 1, base strength, full, SUF and LP-FT (~25 min, 2 cores)
synth-small: $(INSTALL)
	$(PY) -m synthetic.study3 --out $(SYNTH)/small --small
## synth-study1    Study 1 as it ran (4 policies x 2 pretraining x 2 fine-tuning seeds, crossed; ~27 min, 2 cores)
synth-study1: $(INSTALL)
	$(PY) -m synthetic.study --out $(SYNTH) --checkpoint tests/fixtures/synth/pretrain_seed0.bin --lr 3e-4 --record

## synth-xvlmaml   XVL-MAML vs full and SUF on Study 1's seed pairs (docs/synthetic/protocol.md A8; after make synth-study1)
synth-xvlmaml: $(INSTALL)
	$(PY) -m synthetic.xvlmaml_study --out $(SYNTH) --record

## bench           every bench/ script (bench/README.md), their table in docs/benchmarks.md
bench: $(INSTALL)
	$(PY) -m bench.suf_step --out bench/results/suf_step.json
	$(PY) -m bench.retrieval --out bench/results/retrieval.json
	$(PY) -m bench.eval_precision --out bench/results/eval_precision.json
	$(PY) -m bench.run_cost --out bench/results/run_cost.json
	$(PY) -m bench.eval_cost --out bench/results/eval_cost.json
	$(PY) -m bench.table bench/results

## gpu-check       on a GPU (< 5 min): AMP steps, CPU-vs-GPU loss, SUF time/memory, loader, torchrun (bench/gpu_check.py)
.PHONY: gpu-check
gpu-check: $(INSTALL)
	$(PY) -m bench.gpu_check --out bench/results/gpu_check.json

# ---- Table 1: standard fine-tuning vs SUF, both models, three tasks ----
define TRAIN_RULE
## $(1)-$(2)  train $$(MODEL) on English $(1) with policy $(2), evaluate after every epoch (xflickrco: English; all at the end)
$(1)-$(2):
	$$(call require,$$(INPUTS))
	$$(LAUNCH) train_$$(MODEL).py --task $(1) --policy $(2) $$(COMMON) --eval-every 1$(if $(filter xflickrco,$(1)),$$(if $$(XFLICKRCO_EPOCH_LANGS), --eval-langs $$(XFLICKRCO_EPOCH_LANGS))) --output-dir $$(OUT)/$$(MODEL)-$(1)-$(2) $$(EXTRA)
endef
$(foreach t,xgqa xvnli xflickrco marvl,$(foreach p,full suf,$(eval $(call TRAIN_RULE,$(t),$(p)))))

# ---- Figure 5: layer-wise learning-rate decay on xGQA (the paper ran it with CCLM) ----
define LLRD_RULE
xgqa-llrd-$(1):
	$$(call require,$$(INPUTS))
	$$(LAUNCH) train_$$(MODEL).py --task xgqa --policy llrd --llrd-decay $(1) $$(COMMON) --output-dir $$(OUT)/$$(MODEL)-xgqa-llrd$(1) $$(EXTRA)
endef
$(foreach d,0.98 0.95 0.88 0.75,$(eval $(call LLRD_RULE,$(d))))
## xgqa-llrd-sweep  layer-wise LR decay d = 0.98, 0.95, 0.88, 0.75 (Figure 5)
xgqa-llrd-sweep: xgqa-llrd-0.98 xgqa-llrd-0.95 xgqa-llrd-0.88 xgqa-llrd-0.75

# Multilingual-CLIP + translation-based alignment + PET (comparisons/mclip/): its targets live in comparisons/mclip/mclip.mk
include comparisons/mclip/mclip.mk

# ---- Table 2: CCLM, only the 6 cross-modal layers train (+ the answer decoder, the task's output), the rest frozen ----
## xgqa-top6       train only the top 6 layers + task head, rest frozen (CCLM: "CM only", Table 2)
xgqa-top6:
	$(call require,$(INPUTS))
	$(LAUNCH) train_$(MODEL).py --task xgqa --policy top --top-layers 6 $(COMMON) --output-dir $(OUT)/$(MODEL)-xgqa-top6 $(EXTRA)

# ---- Table 3: few-shot (48 shots, standard fine-tuning) after English full / SUF training ----
define FEWSHOT_RULE
## fewshot-xgqa-$(1)  continue $(OUT)/$$(MODEL)-xgqa-$(1) on LANG_FS=$$(LANG_FS)'s SHOTS=$$(SHOTS)-shot split
fewshot-xgqa-$(1):
	$$(call require,$$(DATA)/datasets $$(VISUAL) $$(OUT)/$$(MODEL)-xgqa-$(1)/model_final.pt)
	$$(LAUNCH) eval_zeroshot.py fewshot --checkpoint $$(OUT)/$$(MODEL)-xgqa-$(1)/model_final.pt --lang $$(LANG_FS) --shots $$(SHOTS) --data-root $$(DATA) $$(VISUAL_ARG) --tokenizer $$(TOKENIZER) --output-dir $$(OUT)/$$(MODEL)-xgqa-$(1)-fewshot$$(SHOTS)-$$(LANG_FS) $$(EXTRA)
endef
$(foreach p,full suf,$(eval $(call FEWSHOT_RULE,$(p))))
# ---- MaRVL (issue 25; docs/reproducing.md "MaRVL"): translate-test and few-shot of OUT/MODEL-marvl-<policy> ----
# IGLUE's MaRVL few-shot (experiments/few_shot/uc2/marvl): splits id, tr, zh in 1, 2, 4, 10, 10x2 shots, batch 32,
# selected on NLVR2 dev; a LANG_FS= / SHOTS= given on the command line replaces the defaults id / 10x2.
MARVL_LANG  = $(or $(call given,LANG_FS,$(LANG_FS)),id)
MARVL_SHOTS = $(or $(call given,SHOTS,$(SHOTS)),10x2)
define MARVL_RULE
## translate-test-marvl-$(1)  $(OUT)/$$(MODEL)-marvl-$(1) on MaRVL's machine-translated test files (English: NLVR2 test)
translate-test-marvl-$(1):
	$$(call require,$$(OUT)/$$(MODEL)-marvl-$(1)/model_final.pt $$(filter-out $$(RUN),$$(RUN_PATHS)))
	$$(LAUNCH) eval_zeroshot.py evaluate --run-dir $$(OUT)/$$(MODEL)-marvl-$(1) --translate-test $$(strip $$(RUN_INPUTS)) $$(EXTRA)
## fewshot-marvl-$(1)  continue $(OUT)/$$(MODEL)-marvl-$(1) on LANG_FS=id|tr|zh's SHOTS=1|2|4|10|10x2 split (IGLUE's batch 32)
fewshot-marvl-$(1):
	$$(call require,$$(DATA)/datasets $$(VISUAL) $$(OUT)/$$(MODEL)-marvl-$(1)/model_final.pt)
	$$(LAUNCH) eval_zeroshot.py fewshot --checkpoint $$(OUT)/$$(MODEL)-marvl-$(1)/model_final.pt --lang $$(MARVL_LANG) --shots $$(MARVL_SHOTS) --fs-batch-size 32 --data-root $$(DATA) $$(VISUAL_ARG) --tokenizer $$(TOKENIZER) --output-dir $$(OUT)/$$(MODEL)-marvl-$(1)-fewshot$$(MARVL_SHOTS)-$$(MARVL_LANG) $$(EXTRA)
endef
$(foreach p,full suf,$(eval $(call MARVL_RULE,$(p))))

# ---- evaluation of one run ----
## eval            zero-shot evaluation of RUN= on the run's own split and languages (its args.json: --eval-split, --langs; inputs too unless DATA=/FEATURES=/IMAGES=/TOKENIZER= given)
eval:
	$(need_run)
	$(call require,$(RUN_PATHS))
	$(LAUNCH) eval_zeroshot.py evaluate --run-dir $(RUN) $(strip $(RUN_INPUTS)) $(EXTRA)

## translate-test  the same on IGLUE's machine-translated test files
translate-test:
	$(need_run)
	$(call require,$(RUN_PATHS))
	$(LAUNCH) eval_zeroshot.py evaluate --run-dir $(RUN) --translate-test $(strip $(RUN_INPUTS)) $(EXTRA)

## sanity          before training: evaluate IGLUE's released fine-tuned UC2 xGQA checkpoint (CKPT_FT=) beside IGLUE's published row
sanity:
	$(call require,$(CKPT_FT) $(DATA)/datasets $(FEATURES))
	$(LAUNCH) eval_zeroshot.py evaluate --checkpoint $(CKPT_FT) --released-task xgqa --data-root $(DATA) --features $(FEATURES) --tokenizer $(TOKENIZER) --output-dir $(OUT)/sanity-uc2-xgqa $(EXTRA)
	@echo "IGLUE's published UC2 xGQA zero-shot row (test): en 55.19, avg 29.35. Yours (the table above) should be close: a clear gap points at the set-up (features, tokenizer, split)."

## table1          Tables 1 (2/3 where runs exist) and the per-language Tables 4-6 from every run under OUT=, beside the paper's numbers
table1:
	$(call require,$(OUT))
	$(PY) -m report table --per-language $(OUT)/*/ $(EXTRA)

## figures         Figures 2, 3 (per-epoch curves) and 4 (CLS similarity) for every run under OUT= (inputs: each run's args.json)
figures:
	$(call require,$(OUT))
	$(PY) -m report figures $(OUT)/*/ $(strip $(RUN_INPUTS)) $(EXTRA)

# ---- XVL-MAML (Hu et al. 2023; README "XVL-MAML"), UC2 only: meta-train the English run OUT/uc2-<task>-FROM
# with auxiliary language AUX's IGLUE dev/few-shot data, then zero-shot in every language ----
.PHONY: xvlmaml-xgqa xvlmaml-xvnli xvlmaml-xflickrco xvlmaml-marvl
AUX  ?=
FROM ?= full
## xvlmaml-{xgqa,xvnli,xflickrco}  XVL-MAML continuing OUT/uc2-<task>-FROM (default full) with auxiliary language AUX=<lang>
## xvlmaml-marvl  the same on MaRVL (OUT/uc2-marvl-FROM, AUX's NLVR2 dev-<lang>_gmt or MaRVL few-shot data)
define XVLMAML_RULE
xvlmaml-$(1):
	@[ -n "$$(AUX)" ] || { echo "error: set AUX=<auxiliary language>, e.g. make xvlmaml-$(1) AUX=de" >&2; exit 2; }
	$$(call require,$$(DATA)/datasets $$(FEATURES) $$(OUT)/uc2-$(1)-$$(FROM)/model_final.pt)
	$$(LAUNCH) -m comparisons.xvlmaml.xvlmaml train --run $$(OUT)/uc2-$(1)-$$(FROM) --aux-lang $$(AUX) --data-root $$(DATA) --features $$(FEATURES) --tokenizer $$(TOKENIZER) --output-dir $$(OUT)/uc2-$(1)-$$(FROM)-xvlmaml-$$(AUX) $$(EXTRA)
endef
$(foreach t,xgqa xvnli xflickrco marvl,$(eval $(call XVLMAML_RULE,$(t))))
