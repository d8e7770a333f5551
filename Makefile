# Two commands on a fresh machine:  `make demo`  (the whole pipeline)  and  `make test`.
PYTHON ?= python3
CUB ?= examples/cub_mini
RUN ?= runs/demo
# the shipped mini sample has classes 1, 9 (train) and 14, 17 (test); a full CUB download uses Song et al.'s split
SPLIT ?= $(if $(filter examples/cub_mini,$(CUB)),classes:1-10/11-20,song)
ARGS ?=

# COCO: multi-object retrieval and person search with a COCO-trained ONNX detector (needs onnxruntime, in .[dev]);
# the defaults point at the shared COCO sample beside a development checkout — set COCO/SSD/BACKBONE for yours
COCO ?= ../shared/data/coco_sample
SSD ?= ../shared/weights/coco_ssd_mobilenet_v1_quant
BACKBONE ?= ../shared/weights/torchvision_mobilenet_v2_features_imagenet.pth
COCO_RUN ?= runs/coco
SAMPLE ?= ../shared/data/cub_sample
SAMPLE_RUN ?= runs/sample
comma := ,
space := $(subst ,, )
TEXT_SPLIT ?= classes:1-10/11-20

.PHONY: setup demo detector coco text metric test test-all browser docs docs-tables sync-bench serve-bench scale-bench store-bench engine-bench

setup:
	$(PYTHON) -m pip install -q -e '.[dev]'

# offline by default with a real detector: the COCO-trained ONNX SSD when it is there (birds only, at the TF Object
# Detection API's own 0.5 display threshold), else the boxes shipped beside the photos, else torchvision's Faster R-CNN
DEMO_BOXES ?= $(if $(wildcard $(SSD).onnx),--detector onnx:$(SSD).onnx --labels $(SSD).labels.txt --categories bird --score 0.5,$(if $(wildcard $(CUB)/external_detections.json),--detections $(CUB)/external_detections.json))
DEMO_BACKBONE ?= $(if $(wildcard $(BACKBONE)),--backbone mobilenet_v2 --weights $(BACKBONE))

demo: setup
	cbir run --cub $(CUB) --out $(RUN) --split $(SPLIT) $(DEMO_BOXES) $(DEMO_BACKBONE) $(ARGS)

# photo folders: scanning 100,000 files, and a 1 % sync against a full build (benchmarks/results/sync_bench_cpu.md)
sync-bench: setup
	$(PYTHON) benchmarks/sync_bench.py --photos $(SAMPLE)/images --detector onnx:$(SSD).onnx --labels $(SSD).labels.txt \
	  --weights $(BACKBONE)

# the service under 1, 10 and 50 concurrent clients against the in-process Querier (benchmarks/results/serve_load_cpu.md)
serve-bench: setup
	$(PYTHON) benchmarks/serve_load.py --photos $(SAMPLE)/images --detector onnx:$(SSD).onnx --labels $(SSD).labels.txt \
	  --weights $(BACKBONE)

# train the detector on the CUB sample's classes 1-10 (trunk trained, then frozen), then every detector side by side
DET_RUN ?= runs/det
detector: setup
	cbir prepare --cub $(SAMPLE) --split classes:1-10/11-20 --out $(DET_RUN)
	cbir train-detector --run $(DET_RUN) --trunk mobilenet_v2 --trunk-weights $(BACKBONE)
	cbir train-detector --run $(DET_RUN) --trunk mobilenet_v2 --trunk-weights $(BACKBONE) --trainable-layers 0 \
	  --name detector-mobilenet_v2-frozen
	$(PYTHON) benchmarks/detectors.py --cub $(SAMPLE) --out $(DET_RUN)-compare --backbone mobilenet_v2 --weights $(BACKBONE) \
	  --source trained=$(DET_RUN)/models/detector-mobilenet_v2 --source frozen=$(DET_RUN)/models/detector-mobilenet_v2-frozen \
	  --source yolov5n=external:$(SAMPLE)/external_detections/yolov5n_coco_birds.json --source ssd=onnx:$(SSD).onnx \
	  --own-trunk trained

coco: setup
	cbir run --coco $(COCO)/instances.json --images $(COCO)/images --captions $(COCO)/captions.json \
	  --split coco_split --out $(COCO_RUN) --detector onnx:$(SSD).onnx --labels $(SSD).labels.txt --fallback full \
	  --backbone mobilenet_v2 --weights $(BACKBONE) $(ARGS)
	cbir train-embedder --run $(COCO_RUN) --embeddings gt   # metric learning on boxes, the category as label
	cbir train-embedder --run $(COCO_RUN) --embeddings det
	cbir evaluate-objects --run $(COCO_RUN) --embeddings full,gt,det,gt@multisimilarity,det@multisimilarity
	for t in glove minilm; do \
	  cbir train-text --run $(COCO_RUN) --embeddings full --text $$t && \
	  cbir train-text --run $(COCO_RUN) --embeddings gt --text $$t || exit 1; done   # captions; category names
	cbir evaluate-text --run $(COCO_RUN)

# text search on the CUB sample (classes 1-10 train, 11-20 test unless TEXT_SPLIT): a bridge per set and text encoder, then the report
text: setup
	cbir run --cub $(SAMPLE) --out $(SAMPLE_RUN) --split $(TEXT_SPLIT) --detections $(SAMPLE)/external_detections/yolov5n_coco_birds.json \
	  --backbone mobilenet_v2 --weights $(BACKBONE) $(ARGS)
	for e in gt det; do for t in glove minilm attributes; do \
	  cbir train-text --run $(SAMPLE_RUN) --embeddings $$e --text $$t || exit 1; done; done
	cbir evaluate-text --run $(SAMPLE_RUN)

# metric learning on the CUB sample (classes 1-10 train, 11-20 test): each loss as a head on frozen gt and det vectors
# and as a fine-tuned MobileNetV2 on gt crops, then every trained set against its source in reports/retrieval
METRIC_RUN ?= runs/metric
LOSSES ?= contrastive triplet multisimilarity proxyanchor
metric: setup
	cbir run --cub $(SAMPLE) --out $(METRIC_RUN) --split classes:1-10/11-20 --modes full,gt,det \
	  --detections $(SAMPLE)/external_detections/yolov5n_coco_birds.json --backbone mobilenet_v2 --weights $(BACKBONE) $(ARGS)
	for loss in $(LOSSES); do for e in gt det; do \
	  cbir train-embedder --run $(METRIC_RUN) --embeddings $$e --loss $$loss || exit 1; done; \
	  cbir train-embedder --run $(METRIC_RUN) --embeddings gt --loss $$loss --mode finetune || exit 1; done
	cbir evaluate --run $(METRIC_RUN) --rerank none,kreciprocal --maps pca,tsne,umap --embeddings \
	  gt,det,$(subst $(space),$(comma),$(foreach l,$(LOSSES),gt@$(l),det@$(l),gt@$(l)-ft))
	cbir compare-methods --run $(METRIC_RUN) --embeddings full,det,gt,gt@multisimilarity,det@multisimilarity

# Debian's chromium drives the page test (never a browser download); installed when we may.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium missing: the browser test will be skipped"; }

# the suite CI runs (under 15 minutes on 2 cores); test-all adds the tests marked slow
test: setup browser
	$(PYTHON) -m pytest -q -m "not slow"

test-all: setup browser
	$(PYTHON) -m pytest -q

# the docs site (MkDocs + Material, the `docs` extra) into build/site; --strict: a broken link fails it
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict

# every results table in README.md and docs/ copied again from the report it names (runs/..., benchmarks/results/)
docs-tables:
	$(PYTHON) scripts/docs_tables.py

# 10^7 x 256-d vectors within a memory budget, built from disk and searched memory-mapped, with and without
# --refine (benchmarks/results/scale_bench_cpu.md; ~10 GB of vectors in /tmp/cbir_scale_bench)
scale-bench: setup
	cd benchmarks && $(PYTHON) scale_bench.py --budget 2G --refine 100

# the same stage local and on Ray (1 and 2 loopback nodes of 1 CPU) on the CUB sample, once and 5 times over (31 min;
# benchmarks/results/engine_bench_cpu.md)
engine-bench: setup
	$(PYTHON) benchmarks/engine_bench.py --cub $(SAMPLE) --detector onnx:$(SSD).onnx --labels $(SSD).labels.txt \
	  --weights $(BACKBONE)

# FAISS, Milvus Lite and a real Milvus server (started on loopback by the script) at 10^5 and 10^6
store-bench: setup
	cd benchmarks && $(PYTHON) store_bench.py --sizes 100000,1000000 --factories Flat,IVFSQ8 --stores faiss,milvus,milvus-server
