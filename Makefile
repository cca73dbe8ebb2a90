# The two commands of the README: `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default; GPU users: make test TORCH_REQUIREMENT='torch==2.13.0' with their index.
TORCH_REQUIREMENT ?= torch==2.13.0
EXTRAS ?= dev,s3,gcs,azure
BIN := $(VENV)/bin

.PHONY: setup etcd demo test test-faults bench mutate clean

# The Azure Blob emulator (azurite) for the storage tests, from npm, pinned by tools/package-lock.json.
TOOLS_STAMP := tools/node_modules/.installed

setup: $(VENV)/.installed $(TOOLS_STAMP) etcd

# etcd for the membership store tests (Debian's etcd-server via apt-get, only when `etcd` is missing;
# as root, or with passwordless sudo; otherwise it says what to run). Its service is not left running.
etcd:
	@bash tools/install-etcd.sh

$(TOOLS_STAMP): tools/package.json tools/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix tools --no-audit --no-fund --loglevel=error && touch $@; \
	else \
		echo "npm not found: the Azure storage tests need node/npm (they fail under CI, skip elsewhere)"; \
	fi

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_REQUIREMENT)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(BIN)/python examples/demo.py

# `make test` runs everything but the slow runs under torchrun with SIGKILL (under 20 minutes on
# 2 cores); `make test-faults` runs those (tests marked `faults`: about 12 minutes). CI runs both.
test: setup
	$(BIN)/python -m pytest -q -m "not faults" --durations=15

test-faults: setup
	$(BIN)/python -m pytest -q -m faults --durations=15

bench: setup
	$(BIN)/python benchmarks/bench_io.py  # issue 22 set: about 50 minutes on 2 cores; results/io.json

# Mutation testing (tools/mutate.py): the stated sample, seed 19, 10-25 mutants drawn per target
# (signing, storage commit, membership service and decision, recovery, format, checkpoint,
# storage retry, codecs), each run against its target's fast tests under a per-mutant time
# limit; ~45 minutes on 2 cores shared with other work (load 6-15), at nice 15. MUTATE_ARGS='--all --budget-s 36000' runs
# every mutant. Writes benchmarks/results/mutation.json (sample, score, survivors classified by
# tools/mutation_survivors.json). Not part of `make test`.
MUTATE_ARGS ?=
mutate: setup
	@$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[mutate]"
	nice -n 15 $(BIN)/python tools/mutate.py $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info mutants mutants.log
