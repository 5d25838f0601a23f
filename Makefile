# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python
# torch is pinned to this machine's CPU build; installing it first keeps pip
# from ever resolving a CUDA build for the >=2.13,<2.14 range in pyproject.toml.
TORCH := torch==2.13.0

.PHONY: setup demo test lint bench proto clean

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,s3,zstd]' $(TORCH)
	touch $@

setup: .venv/.installed

demo: setup
	$(PY) -m ckpt.demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check ckpt tests bench

bench: setup
	$(PY) bench/bench_save_load.py

proto: setup
	$(PY) -m grpc_tools.protoc -Iproto --python_out=ckpt/_proto --grpc_python_out=ckpt/_proto --pyi_out=ckpt/_proto proto/ckpt.proto
	sed -i 's/^import ckpt_pb2 as/from . import ckpt_pb2 as/' ckpt/_proto/ckpt_pb2_grpc.py

clean:
	rm -rf .venv build *.egg-info
