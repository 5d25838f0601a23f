# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python
# torch is pinned to this machine's CPU build; installing it first keeps pip
# from ever resolving a CUDA build for the >=2.13,<2.14 range in pyproject.toml.
# constraints.txt holds that pin and every pip install obeys it (-c), so no
# dependency added later can replace torch.
TORCH := $(shell grep '^torch==' constraints.txt)
PIP := $(PY) -m pip install -q -c constraints.txt
# Tests that start no process and finish quickly (markers: pyproject.toml).
FAST := not dist and not s3 and not daemon and not faults and not subprocess and not slow

.PHONY: setup demo test test-fast lint bench proto clean

.venv/.installed: pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)
	DS_BUILD_OPS=0 $(PIP) -e '.[dev,s3,zstd,test]' $(TORCH)
	touch $@

setup: .venv/.installed

demo: setup
	$(PY) -m ckpt.demo

test: setup
	$(PY) -m pytest -q

# Spread over the cores, temp files in RAM, rewritten test modules cached (this machine's
# environment sets PYTHONDONTWRITEBYTECODE, which would make pytest rewrite them every run).
test-fast: setup
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q -n auto -m "$(FAST)" \
		$(if $(wildcard /dev/shm),--basetemp=/dev/shm/ckpt-test-fast-$(shell id -u))

lint: setup
	$(PY) -m ruff check ckpt tests bench server

bench: setup
	$(PY) bench/bench_save_load.py

proto: setup
	$(PY) -m grpc_tools.protoc -Iproto --python_out=ckpt/_proto --grpc_python_out=ckpt/_proto --pyi_out=ckpt/_proto proto/ckpt.proto
	sed -i 's/^import ckpt_pb2 as/from . import ckpt_pb2 as/' ckpt/_proto/ckpt_pb2_grpc.py

clean:
	rm -rf .venv build *.egg-info
