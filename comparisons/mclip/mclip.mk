# Multilingual-CLIP: translation-based alignment + parameter-efficient tuning (comparisons/mclip/train_mclip.py; README section).
# Included by the Makefile after its common variables (PY, OUT, EXTRA).
# LANG= is read from the command line only (the environment's LANG is the locale).
XTD         ?= data/XTD10
MULTI30K    ?= data/multi30k-dataset
COCO        ?= data/coco2014
FLICKR      ?= data/multi30k-dataset
MCLIP       ?= checkpoints/M-CLIP-XLM-Roberta-Large-Vit-L-14
CLIP_VISION ?= checkpoints/clip-vit-large-patch14
XTD_FEATS   ?= $(OUT)/features/xtd-clip-vitl14.pt
M30K_FEATS  ?= $(OUT)/features/multi30k-clip-vitl14.pt
M30K2_FEATS ?= $(OUT)/features/multi30k-task2-clip-vitl14.pt
PET_LANG    := $(if $(filter command line,$(origin LANG)),$(LANG),de)
ROUTINE     ?= method3
PET         ?= lora
ALIGN       ?= mse
NSHOT       ?= 50
M30K_SHOT   ?= 0
XTD_LANGS   := en de fr es it jp ko pl ru tr zh
M30K_LANGS  := en de fr cs
M30K2_LANGS := en de
mclip_require = @missing=""; for p in $(1); do [ -e "$$p" ] || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "error: missing input(s):$$missing (set XTD=, MULTI30K=, COCO=, FLICKR=, MCLIP=, CLIP_VISION=, XTD_FEATS=, M30K_FEATS= or M30K2_FEATS=; see README)" >&2; exit 2; fi
MCLIP_ARGS   = --routine $(ROUTINE) --align-loss $(ALIGN) --pet $(PET) --text-checkpoint $(MCLIP) --tokenizer $(MCLIP)
.PHONY: mclip-help synth-mclip pet-features-xtd pet-features-multi30k pet-xtd pet-multi30k pet-xtd-grid pet-multi30k-grid pet-table pet-clip-en-xtd \
	pet-features-multi30k-task2 pet-multi30k-task2 pet-multi30k-task2-grid pet-clip-en-multi30k pet-clip-en-multi30k-task2

## pet-features-xtd   CLIP ViT-L/14 image features of XTD10 (COCO=train2014/ val2014/ folder), once for all runs
pet-features-xtd:
	$(call mclip_require,$(XTD) $(COCO) $(CLIP_VISION))
	$(PY) -m comparisons.mclip.train_mclip features --dataset xtd --data-root $(XTD) --images $(COCO) --clip-vision $(CLIP_VISION) --out $(XTD_FEATS)

## pet-features-multi30k  the same for Multi30K (FLICKR= folder holding flickr30k-images/)
pet-features-multi30k:
	$(call mclip_require,$(MULTI30K) $(FLICKR) $(CLIP_VISION))
	$(PY) -m comparisons.mclip.train_mclip features --dataset multi30k --data-root $(MULTI30K) --images $(FLICKR) --clip-vision $(CLIP_VISION) --out $(M30K_FEATS)

## pet-xtd            one XTD10 run: LANG= ROUTINE=baseline1..method3 PET=lora|lora_cross|adapter|compacter|prompt|full|none NSHOT=50
pet-xtd:
	$(call mclip_require,$(XTD) $(MCLIP) $(XTD_FEATS))
	$(PY) -m comparisons.mclip.train_mclip --dataset xtd --data-root $(XTD) --lang $(PET_LANG) $(MCLIP_ARGS) --n-shot $(NSHOT) --image-features $(XTD_FEATS) --output-dir $(OUT)/mclip-xtd$(NSHOT)-$(PET_LANG)-$(ROUTINE)-$(PET) $(EXTRA)

## pet-multi30k       one Multi30K run (M30K_SHOT=0: full data)
pet-multi30k:
	$(call mclip_require,$(MULTI30K) $(MCLIP) $(M30K_FEATS))
	$(PY) -m comparisons.mclip.train_mclip --dataset multi30k --data-root $(MULTI30K) --lang $(PET_LANG) $(MCLIP_ARGS) --n-shot $(M30K_SHOT) --image-features $(M30K_FEATS) --output-dir $(OUT)/mclip-multi30k$(M30K_SHOT)-$(PET_LANG)-$(ROUTINE)-$(PET) $(EXTRA)

## pet-features-multi30k-task2  the same for Multi30K task 2 (data/task2's image lists; FLICKR= as above)
pet-features-multi30k-task2:
	$(call mclip_require,$(MULTI30K) $(FLICKR) $(CLIP_VISION))
	$(PY) -m comparisons.mclip.train_mclip features --dataset multi30k_task2 --data-root $(MULTI30K) --images $(FLICKR) --clip-vision $(CLIP_VISION) --out $(M30K2_FEATS)

## pet-multi30k-task2  one Multi30K task 2 run (LANG=en|de; the first description per image; M30K_SHOT=0: full data)
pet-multi30k-task2:
	$(call mclip_require,$(MULTI30K) $(MCLIP) $(M30K2_FEATS))
	$(PY) -m comparisons.mclip.train_mclip --dataset multi30k_task2 --data-root $(MULTI30K) --lang $(PET_LANG) $(MCLIP_ARGS) --n-shot $(M30K_SHOT) --image-features $(M30K2_FEATS) --output-dir $(OUT)/mclip-multi30k_task2-$(M30K_SHOT)-$(PET_LANG)-$(ROUTINE)-$(PET) $(EXTRA)

## pet-xtd-grid       pet-xtd for all 11 XTD10 languages (same ROUTINE= PET=)
pet-xtd-grid:
	@for l in $(XTD_LANGS); do $(MAKE) --no-print-directory pet-xtd LANG=$$l || exit 1; done
## pet-multi30k-grid  pet-multi30k for its 4 languages
pet-multi30k-grid:
	@for l in $(M30K_LANGS); do $(MAKE) --no-print-directory pet-multi30k LANG=$$l || exit 1; done
## pet-multi30k-task2-grid  pet-multi30k-task2 for its 2 languages
pet-multi30k-task2-grid:
	@for l in $(M30K2_LANGS); do $(MAKE) --no-print-directory pet-multi30k-task2 LANG=$$l || exit 1; done

## pet-table          per-language R@1, average, range and std of every mclip run under OUT=, the paper's reported drops; BASELINE=<group> adds each group's change of range and std against it
pet-table:
	$(call mclip_require,$(OUT))
	$(PY) -m comparisons.mclip.train_mclip table $(OUT)/mclip-*/ $(if $(BASELINE),--baseline $(BASELINE))

## synth-mclip       the method in the synthetic world vs SUF, with intervals (docs/synthetic/protocol.md Study 2; SYNTH=synth_out)
synth-mclip: $(INSTALL)
	@[ -e $(SYNTH)/world/world.json ] || $(PY) -m synthetic.world --out $(SYNTH)/world
	$(PY) -m synthetic.mclip_study --world $(SYNTH)/world --out $(SYNTH)/mclip --record

# `make help` lists these targets too (the Makefile's help target reads this file's ## lines); mclip-help alone:
mclip-help:
	@grep -E '^## ' comparisons/mclip/mclip.mk | sed 's/^## //'

## pet-clip-en-xtd    the reference's English-CLIP baseline (run_mono_XTD.py): CLIP ViT-L/14's own text tower on LANG='s MT->en captions (ROUTINE=method3|baseline2; baseline1: native), no training
pet-clip-en-xtd:
	$(call mclip_require,$(XTD) $(CLIP_VISION) $(XTD_FEATS))
	$(PY) -m comparisons.mclip.translate_test --dataset xtd --data-root $(XTD) --lang $(PET_LANG) --routine $(ROUTINE) --n-shot $(NSHOT) --clip $(CLIP_VISION) --image-features $(XTD_FEATS) --output-dir $(OUT)/mclip-clipen-xtd$(NSHOT)-$(PET_LANG)-$(ROUTINE)

## pet-clip-en-multi30k  the same baseline on Multi30K task 1's whole test split (run_mono_task1.py; M30K_SHOT= names the group)
pet-clip-en-multi30k:
	$(call mclip_require,$(MULTI30K) $(CLIP_VISION) $(M30K_FEATS))
	$(PY) -m comparisons.mclip.translate_test --dataset multi30k --data-root $(MULTI30K) --lang $(PET_LANG) --routine $(ROUTINE) --n-shot $(M30K_SHOT) --clip $(CLIP_VISION) --image-features $(M30K_FEATS) --output-dir $(OUT)/mclip-clipen-multi30k$(M30K_SHOT)-$(PET_LANG)-$(ROUTINE)

## pet-clip-en-multi30k-task2  and on task 2's (run_mono_task2.py; LANG=en|de)
pet-clip-en-multi30k-task2:
	$(call mclip_require,$(MULTI30K) $(CLIP_VISION) $(M30K2_FEATS))
	$(PY) -m comparisons.mclip.translate_test --dataset multi30k_task2 --data-root $(MULTI30K) --lang $(PET_LANG) --routine $(ROUTINE) --n-shot $(M30K_SHOT) --clip $(CLIP_VISION) --image-features $(M30K2_FEATS) --output-dir $(OUT)/mclip-clipen-multi30k_task2-$(M30K_SHOT)-$(PET_LANG)-$(ROUTINE)
