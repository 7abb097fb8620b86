# Two commands on a fresh clone:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test export clean-nbs lab

setup: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@command -v java >/dev/null || echo "note: no Java found: caption metrics need a JRE (apt-get install default-jre-headless)"
	@command -v chromium >/dev/null || echo "note: no Chromium found: tests/test_serve.py drives it (apt-get install chromium)"
	touch $(STAMP)

demo: setup           ## the tiny pipeline end to end: world, tiny CLIP/LLaMA, stage 1, stage 2, evaluation; then accuracy against time
	$(BIN)/anymal demo --curve

test: setup           ## notebooks clean + anymal/ in sync + every notebook executed + pytest
	BIN=$(BIN) bash tools/test.sh

export: setup         ## regenerate anymal/ from nbs/
	$(BIN)/nbdev-export

clean-nbs: setup      ## strip notebook outputs/metadata noise
	$(BIN)/nbdev-clean && $(BIN)/nbdev-clean --fname lessons

lab: setup            ## open the course in JupyterLab
	$(BIN)/jupyter lab lessons
