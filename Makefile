# The two commands a newcomer runs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo_out
STAMP := $(VENV)/.installed
# Demo teacher: a random-weight ViT-S at 112 px stands in for H-optimus-0 (no downloads here).
DEMO_TEACHER ?= vit_small_patch16_224
# Demo student: a random-weight ViT-Ti at 64 px stands in for the ViT-L student (CPU minutes).
DEMO_STUDENT ?= vit_tiny_patch16_224

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

$(DEMO)/slides/.done: $(STAMP)
	$(BIN)/g2l demo slides $(DEMO)/slides --n-slides 8 --centers 3 --seed 0
	touch $@

DEMO_TILING := --tile-size 128 --crop-size 112 --max-tiles-per-slide 48 --views 4

demo: install $(DEMO)/slides/.done
	$(BIN)/g2l cache plan $(DEMO)/slides --out $(DEMO)/cache --teacher $(DEMO_TEACHER) $(DEMO_TILING) --gpu h100
	$(BIN)/g2l cache build $(DEMO)/slides --out $(DEMO)/cache --teacher $(DEMO_TEACHER) \
		--random-init $(DEMO_TILING) --batch-size 32
	$(BIN)/g2l cache info $(DEMO)/cache
	$(BIN)/g2l student fit $(DEMO)/cache --out $(DEMO)/run --overwrite --student $(DEMO_STUDENT) \
		--random-init --img-size 64 --steps 300 --batch-size 32 --lr 5e-4 --val-fraction 0.25 \
		--checkpoint-every 100 --num-workers 1
	$(BIN)/g2l demo tiles $(DEMO)/tiles --n-crops 40 --centers 3
	$(BIN)/g2l embed $(DEMO_TEACHER) $(DEMO)/tiles/tiles.csv --random-init --img-size 112 \
		--out $(DEMO)/eval/teacher.parquet
	$(BIN)/g2l embed $(DEMO)/run $(DEMO)/tiles/tiles.csv --out $(DEMO)/eval/student.parquet
	$(BIN)/g2l embed $(DEMO_STUDENT) $(DEMO)/tiles/tiles.csv --random-init --img-size 64 \
		--out $(DEMO)/eval/untrained-student.parquet
	$(BIN)/g2l eval compare $(DEMO)/eval/teacher.parquet $(DEMO)/eval/student.parquet \
		$(DEMO)/eval/untrained-student.parquet --reference teacher --out $(DEMO)/report
	$(BIN)/g2l student export $(DEMO)/run --evaluation $(DEMO)/report
	$(BIN)/g2l cache info $(DEMO)/cache --runs $(DEMO)/run
	@echo
	@echo "cache:      $(DEMO)/cache   (tables: $(DEMO)/cache/*.parquet)"
	@echo "cache page: $(DEMO)/cache/report.html   (every slide's QC picture; open in a browser)"
	@echo "QC:         $(DEMO)/cache/qc/  (pictures, and GeoJSON for QuPath: File > Import objects)"
	@echo "plan:       $(DEMO)/cache/plan.json"
	@echo "run:        $(DEMO)/run     (metrics.csv, loss.png, export/student.safetensors)"
	@echo "model card: $(DEMO)/run/export/README.md"
	@echo "evaluation: $(DEMO)/report/report.html  (and report.md, metrics.csv, bars-*.png, ri-curve-*.png, map-*.png)"

test: install
	$(BIN)/python -m pytest -q

# CPU benchmarks (a few minutes each): figures in benchmarks/results/NAME.json.
bench: install
	cd benchmarks && ../$(BIN)/python cache_build.py
	cd benchmarks && ../$(BIN)/python student_fit.py
	cd benchmarks && ../$(BIN)/python cached_vs_online.py
	cd benchmarks && ../$(BIN)/python cache_read.py
	cd benchmarks && ../$(BIN)/python storage.py
	cd benchmarks && ../$(BIN)/python scaling.py

clean:
	rm -rf $(DEMO) .pytest_cache
