"""``ckpt --help``, ``ls`` and ``info`` of local paths never import torch (it alone takes seconds to
import) nor fsspec (a tenth of a second); their start-up time is measured by bench/bench_cli_startup.py.
``info`` of an HF model directory reads torch's safetensors support but never imports transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import ckpt

PROBE = (
    "import sys; from ckpt.cli import main\n"
    "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
    "heavy = [m for m in ('torch', 'numpy', 'fsspec') if m in sys.modules]\n"
    "assert not heavy, heavy\nsys.exit(rc)"
)


@pytest.mark.dist  # starts fresh interpreters (the nearest process marker; none says "subprocess")
def test_help_ls_and_info_import_no_torch_nor_fsspec(tmp_path):
    root = tmp_path / "run"
    manager = ckpt.Manager(str(root), handle_sigterm=False)
    manager.save(1, {"w": torch.ones(3), "rng": (1, 2.5, float("nan"))}, metrics={"loss": float("inf")})
    manager.close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for args in (["--help"], ["ls", str(root)], ["ls", "--json", str(root)], ["info", str(root / "step-00000001")],
                 ["info", "--json", str(root / "step-00000001")]):
        done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env)
        assert done.returncode == 0, (args, done.stderr)
        if "--json" in args:  # standard JSON: non-finite floats are typed values, not NaN / Infinity tokens
            assert "NaN" not in done.stdout and "Infinity" not in done.stdout and '"$ckpt": "float"' in done.stdout


HF_PROBE = (
    "import sys; from ckpt.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "assert 'transformers' not in sys.modules, 'transformers imported'\nsys.exit(rc)"
)


@pytest.mark.dist
def test_info_of_hf_model_directory_imports_no_transformers(tmp_path):
    """A model directory whose config ties weights (what resolving the tie asks transformers about):
    ``info`` lists the tensors its files hold, the tied source once, without that import."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model_dir = str(tmp_path / "model")
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", HF_PROBE, "info", "--json", model_dir], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr
    tensors = json.loads(done.stdout)["tensors"]
    assert tensors["model.embed_tokens.weight"]["shape"] == [16, 8] and "lm_head.weight" not in tensors
