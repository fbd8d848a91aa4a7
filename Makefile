# Two commands set everything up on a fresh machine:
#   make demo   create .venv if missing, install, build the emoji corpus, pre-train on CPU, evaluate, report
#               (runs/demo/report.html); re-running reuses the corpus and the checkpoints
#   make test   create .venv if missing, install, run the test suite
#   make lint   ruff check + ruff format --check (CI runs both: .ci/run)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install lint test test-all demo smoke toy-data toy-clips vat-smoke vatt-demo bench bench-deploy bench-index bench-sentences bench-text-image text-image-index bench-standin bench-faults bench-serve bench-objectives system-deps clean-runs

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,ray]'
	@# clip-retrieval's own client (protocol test) and CLIP_benchmark's converter and build (format tests): their
	@# packages pull a second torch stack or Java tools, so no deps
	$(PY) -m pip install -q --no-deps 'clip-retrieval==2.45.0' 'clip-benchmark==1.6.2'
	@touch $(STAMP)

install: $(STAMP)

# What the tests need beyond PyPI, from Debian when we can (root + apt), as the demo does:
# chromium for the browser test (no browser download), rsvg-convert for the corpus rasterisers, strace for
# the power-loss model (tests/test_powerloss_model.py, benchmarks/faults.py --sections powerloss).
SYSTEM_DEPS := 'chromium|chromium-browser:chromium' 'rsvg-convert:librsvg2-bin' 'strace:strace'
system-deps:
	@scripts/system_deps.sh $(SYSTEM_DEPS)

# ruff's lint and format checks (configured in pyproject.toml); `ruff format .` applies the format
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(STAMP) system-deps
	$(PY) -m pytest -m '' $(PYTEST_ARGS)

data/toy/shards/manifest.json:
	$(MAKE) install
	$(PY) scripts/make_toy_images.py --out data/toy --count 500
	$(VENV)/bin/mmpretrain shards make --images data/toy --captions data/toy/captions.csv --out data/toy/shards --max-count 100

toy-data: data/toy/shards/manifest.json

data/toy_clips/shards/manifest.json:
	$(MAKE) install
	$(PY) scripts/make_toy_clips.py --out data/toy_clips --count 400
	$(VENV)/bin/mmpretrain shards make --video --images data/toy_clips --captions data/toy_clips/captions.csv --out data/toy_clips/shards --max-count 100

toy-clips: data/toy_clips/shards/manifest.json

vat-smoke: $(STAMP) toy-clips
	$(VENV)/bin/mmpretrain train configs/experiment/vat_smoke.yaml train.resume=latest
	$(PY) scripts/summarize_run.py runs/vat_smoke

demo: $(STAMP)
	$(PY) scripts/demo.py

# VATT on the motion corpus (docs/video_audio.md): build it, train video-audio-text, evaluate held-out splits
data/motion/manifest.json: | $(STAMP)
	$(VENV)/bin/mmpretrain data build motion --out data/motion

MOTION_SETS := seen@shards:concept,motion=data/motion/eval/seen \
	heldout@shards:concept,motion=data/motion/eval/heldout_combos \
	unseen@shards:concept,motion=data/motion/eval/unseen_concepts

vatt-demo: $(STAMP) data/motion/manifest.json
	$(VENV)/bin/mmpretrain train configs/experiment/motion_vat.yaml train.resume=latest
	$(PY) scripts/summarize_run.py runs/motion_vat
	$(VENV)/bin/mmpretrain eval media --model runs/motion_vat/checkpoints --modalities video audio --clips 2 --crops 3 \
		--data $(MOTION_SETS) --out runs/motion_vat/eval_media.json --plot runs/motion_vat/eval_media.png

smoke: $(STAMP) toy-data
	$(VENV)/bin/mmpretrain train configs/experiment/smoke.yaml train.resume=latest
	$(PY) scripts/summarize_run.py runs/smoke

# the CPU suite (run it with nothing else on the machine; a few hours on 2 cores): every script writes its log to
# benchmarks/results/NAME_DATE.log, its first line the command and the commit (docs quote figures by these logs)
RESULTS := benchmarks/results
TODAY = $$(date +%F)
bench: $(STAMP) toy-data system-deps
	$(PY) benchmarks/train_throughput.py > $(RESULTS)/train_throughput_$(TODAY).log
	$(PY) benchmarks/zero_shot.py > $(RESULTS)/zero_shot_$(TODAY).log
	$(PY) benchmarks/loss_memory.py > $(RESULTS)/loss_memory_$(TODAY).log
	$(PY) benchmarks/decode.py > $(RESULTS)/decode_$(TODAY).log
	$(PY) benchmarks/embed_scale.py > $(RESULTS)/embed_scale_$(TODAY).log
	$(PY) benchmarks/curate.py > $(RESULTS)/curate_$(TODAY).log
	$(PY) benchmarks/tuning_queries.py --log $(RESULTS)/tuning_queries_$(TODAY).log
	$(PY) benchmarks/attack.py --log $(RESULTS)/attack_$(TODAY).log
	$(MAKE) bench-index bench-sentences bench-text-image bench-serve bench-standin bench-faults bench-objectives bench-deploy

# the encoding backends (torch, onnxruntime fp32/int8) and LoRA against a full fine-tune (issue 31; ~40 min):
# need `make demo` (its model, corpus and index) and the icon corpus for the LoRA runs (runs/bench_lora reused)
bench-deploy: $(STAMP)
	@test -f runs/demo/lit/resolved.yaml || $(MAKE) demo
	$(PY) benchmarks/backends.py --log $(RESULTS)/backends_$(TODAY).log
	@test -f data/icons/manifest.json || $(VENV)/bin/mmpretrain data build icons
	$(PY) benchmarks/lora.py --log $(RESULTS)/lora_$(TODAY).log

# each training objective on the emoji corpus (issue 29; ~50 min): needs `make demo` (its corpus, and its
# LiT model as the distillation teacher); finished runs in runs/bench_objectives are reused
bench-objectives: $(STAMP)
	@test -f runs/demo/lit/resolved.yaml || $(MAKE) demo
	$(PY) benchmarks/objectives.py --log $(RESULTS)/objectives_$(TODAY).log

# the synthetic blobs (an oracle for IVF: a labelled stand-in, quoted beside the real sentence figures)
bench-index: $(STAMP)
	$(PY) benchmarks/index.py --sizes 1000000 --data clustered --types ivf_sq8 ivf_rabitq_refine ivf_pqfs_refine \
		ivf_flat > $(RESULTS)/index_1m_$(TODAY).log

# 1M real sentence embeddings (19 pinned Debian packages, MiniLM through onnxruntime; ~30 min to embed on
# 2 cores), then the index types the builder chooses among at 1M on them (~30 min)
bench-sentences: $(STAMP)
	$(PY) benchmarks/sentences.py > $(RESULTS)/sentences_1m_$(TODAY).log
	$(PY) benchmarks/index.py --data sentences --sizes 1000000 --types ivf_flat ivf_sq8 ivf_pqfs_refine \
		ivf_rabitq_refine --out runs/bench_index_sentences_1m > $(RESULTS)/index_sentences_1m_$(TODAY).log

# 1M real text->image vectors (issue 28): the demo's LiT model over every emoji and icon image and augmented
# views of them (~20 min on 2 cores), queried by held-out captions; the index types at 1M on them (~30 min);
# the builder's own choice, tuned on half of the caption queries and measured on the other half; and the
# builder tuned on items vs on captions, measured on other captions (~6 min)
TEXT_IMAGE := benchmarks/data/text_image
bench-text-image: $(STAMP)
	@test -f runs/demo/lit/resolved.yaml || $(MAKE) demo
	@test -f data/icons/manifest.json || $(VENV)/bin/mmpretrain data build icons --out data/icons
	$(PY) benchmarks/text_image.py --log $(RESULTS)/text_image_1m_$(TODAY).log
	$(PY) benchmarks/index.py --data text_image --sizes 1000000 --types ivf_flat ivf_sq8 ivf_pqfs_refine \
		ivf_rabitq_refine --out runs/bench_index_text_image_1m > $(RESULTS)/index_text_image_1m_$(TODAY).log
	$(MAKE) text-image-index
	$(PY) benchmarks/tuning_queries.py --embeddings $(TEXT_IMAGE)/vectors --types ivf_sq8 ivf_pqfs_refine \
		--log $(RESULTS)/tuning_queries_text_image_1m_$(TODAY).log

text-image-index: $(STAMP)
	( echo "# retrieval index build $(TEXT_IMAGE)/vectors --out $(TEXT_IMAGE)_index --queries-file $(TEXT_IMAGE)/queries_all.npy   ($$(date +%F), $$(nproc) CPU cores, commit $$(git rev-parse --short HEAD))"; \
	  $(VENV)/bin/retrieval index build $(TEXT_IMAGE)/vectors --out $(TEXT_IMAGE)_index \
	  --queries-file $(TEXT_IMAGE)/queries_all.npy 2>&1 | grep -v 'it/s\|part/s' ) > $(RESULTS)/text_image_index_1m_$(TODAY).log

# the service under load on the builder's index over the 1M real text->image vectors (bench-text-image builds
# them), with torch and with the demo model's ONNX export encoding the queries (docs/retrieval.md quotes both)
bench-serve: $(STAMP)
	@test -f $(TEXT_IMAGE)_index/index.json || $(MAKE) bench-text-image
	$(PY) benchmarks/serve_load.py $(TEXT_IMAGE)_index --log $(RESULTS)/serve_load_1m_$(TODAY).log \
		--plot $(RESULTS)/serve_load_1m_$(TODAY).png
	$(VENV)/bin/mmpretrain export --model runs/demo/lit/checkpoints --format onnx --out runs/demo/onnx
	$(PY) benchmarks/serve_load.py $(TEXT_IMAGE)_index --onnx runs/demo/onnx --log $(RESULTS)/serve_load_1m_onnx_$(TODAY).log \
		--plot $(RESULTS)/serve_load_1m_onnx_$(TODAY).png

# the calibrated synthetic stand-in in the demo model's space (benchmarks/standin.py), for scales beyond the
# real sets: 1M here, fitted on the demo model's embeddings of the emoji shards (tuning_queries.py caches them)
STANDIN := benchmarks/data/standin_1m
bench-standin: $(STAMP)
	$(PY) benchmarks/standin.py benchmarks/data/tuning_queries_emb $(STANDIN) --n 1000000 \
		--text-queries $(STANDIN)_text_queries.npy > $(RESULTS)/standin_$(TODAY).log
	( echo "# retrieval index build $(STANDIN) --out $(STANDIN)_index --queries-file $(STANDIN)_text_queries.npy   ($$(date +%F), $$(nproc) CPU cores, commit $$(git rev-parse --short HEAD))"; \
	  $(VENV)/bin/retrieval index build $(STANDIN) --out $(STANDIN)_index --queries-file $(STANDIN)_text_queries.npy \
	  2>&1 | grep -v 'it/s\|part/s' ) > $(RESULTS)/standin_index_$(TODAY).log

# the fault suite (kill -9, power loss, poison, SIGTERM, resume; ~30 min on 2 cores): docs/training.md quotes its log
bench-faults: $(STAMP) system-deps
	$(PY) benchmarks/faults.py --log $(RESULTS)/faults_$(TODAY).log

clean-runs:
	rm -rf runs
