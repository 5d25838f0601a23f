"""A training checkpoint exported for the HF Hub loads with transformers' ``from_pretrained``: the
model's sub-tree under transformers' names, tied embeddings stored once, config and tokenizer files
beside the shards, no missing or unexpected keys, identical outputs; and an HF model directory with
tied weights converts into a checkpoint that loads strictly into the model's state dict.

The models are tiny transformers models built from a config (no download): a Llama with
``tie_word_embeddings`` and a word-level tokenizer made with ``tokenizers``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import run_cli, same_bits

import ckpt

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

pytestmark = pytest.mark.slow  # transformers' import and a training step: seconds, not milliseconds

TIED = "lm_head.weight"
SOURCE = "model.embed_tokens.weight"
WORDS = ["[UNK]", "[PAD]", *(f"w{i}" for i in range(62))]


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config)


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture
def trained(tmp_path):
    """(model after one AdamW step, its training checkpoint, the base model directory it started from)."""
    model = tiny_llama()
    base = str(tmp_path / "base")
    model.save_pretrained(base)  # what a fine-tuning job starts from: config.json, weights...
    tokenizer().save_pretrained(base)  # ... and the tokenizer files
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, len(WORDS), (2, 12), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    optim.step()
    assert same_bits(model.state_dict()[TIED], model.state_dict()[SOURCE])  # one parameter, two names
    uri = str(tmp_path / "run" / "step-1")
    ckpt.save({"model": model.state_dict(), "optim": optim.state_dict(), "step": 1}, uri, step=1)
    return model.eval(), uri, base


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_export_loads_with_from_pretrained_no_missing_keys_same_outputs(trained, tmp_path, shard):
    model, uri, base = trained
    out = str(tmp_path / "hub")
    args = ["--only", "model", "--strip-prefix", "model.", "--config-dir", base]
    if shard:
        args += ["--max-shard-size", shard]
    code, said, err = run_cli("export", uri, out, "--to", "safetensors", *args)
    assert code == 0, err
    assert f"tied: {TIED} -> {SOURCE}" in said

    names = set(os.listdir(out))
    if shard:
        index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and all(os.path.getsize(os.path.join(out, s)) <= 20_000 for s in shards)
        stored = set(index["weight_map"])
        assert names >= {*shards, "model.safetensors.index.json"} and "model.safetensors" not in names
    else:
        from safetensors import safe_open

        with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
            stored = set(f.keys())
    # the tie is stored once, under the name transformers keeps; nothing of the optimizer
    assert SOURCE in stored and TIED not in stored and not any(k.startswith(("optim", "model.model")) for k in stored)
    assert stored == set(model.state_dict()) - {TIED}
    # config, generation config and tokenizer files came along; the base model's weights did not
    side = {n for n in os.listdir(base) if not n.endswith(".safetensors")}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= side <= names

    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert info["mismatched_keys"] == set() and not info["error_msgs"], info
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # re-tied
    for k, v in model.state_dict().items():
        assert same_bits(loaded.state_dict()[k], v), k  # trained values, not the base model's
    ids = torch.randint(0, len(WORDS), (3, 9), generator=torch.Generator().manual_seed(2))
    assert torch.equal(logits(loaded.eval(), ids), logits(model, ids))
    text = "w1 w5 w9 nope"
    assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tokenizer()(text)["input_ids"]


def test_export_refuses_what_would_not_load_and_leaves_nothing(trained, tmp_path):
    model, uri, base = trained
    out = str(tmp_path / "hub")
    # without --strip-prefix every key is off by "model.": refused before writing, with the fix as hint
    code, _, err = run_cli("export", uri, out, "--to", "safetensors", "--only", "model", "--config-dir", base)
    assert code == 1 and "LlamaForCausalLM" in err and "--strip-prefix model." in err and not os.path.exists(out)
    # a sub-tree that is not there
    code, _, err = run_cli("export", uri, out, "--to", "safetensors", "--only", "nope")
    assert code == 2 and "nothing under 'nope'" in err and "model, optim, step" in err and not os.path.exists(out)
    # a prefix some key lacks
    code, _, err = run_cli("export", uri, out, "--to", "safetensors", "--strip-prefix", "model.")
    assert code == 2 and "does not start with 'model.'" in err and not os.path.exists(out)
    # --config-dir is for safetensors
    code, _, err = run_cli("export", uri, out, "--to", "torch", "--config-dir", base)
    assert code == 2 and "--config-dir applies to --to safetensors" in err

    # weights the config says are tied but that differ in the checkpoint: storing one would change the model
    sd = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
    sd["model"][TIED][0, 0] += 1
    untied = str(tmp_path / "untied")
    ckpt.save(sd, untied)
    args = ["--only", "model", "--strip-prefix", "model.", "--config-dir", base]
    code, _, err = run_cli("export", untied, out, "--to", "safetensors", *args)
    assert code == 1 and f"model.{TIED} and model.{SOURCE} are tied" in err and not os.path.exists(out)


def test_explicit_tie_without_config(trained, tmp_path):
    """--tie says what is tied when no model directory (or no transformers) can."""
    model, uri, _ = trained
    out = str(tmp_path / "w.safetensors")
    code, _, err = run_cli(
        "export", uri, out, "--to", "safetensors", "--only", "model", "--strip-prefix", "model.",
        "--tie", f"{TIED}={SOURCE}",
    )
    assert code == 0, err
    from safetensors.torch import load_file

    stored = load_file(out)
    assert set(stored) == set(model.state_dict()) - {TIED}
    assert all(same_bits(stored[k], model.state_dict()[k]) for k in stored)
    with pytest.raises(SystemExit) as e:  # argparse refuses it: usage error
        run_cli("export", uri, str(tmp_path / "x"), "--to", "safetensors", "--tie", "a")
    assert e.value.code == 2


def test_convert_of_tied_hf_model_loads_strictly(trained, tmp_path):
    """transformers' own directory stores the tied weight once; converted, it loads into the model's
    state dict (which names both) with strict=True, and so does the directory itself."""
    _, _, base = trained
    from safetensors import safe_open

    with safe_open(os.path.join(base, "model.safetensors"), "pt") as f:
        assert TIED not in f.keys()
    want = transformers.AutoModelForCausalLM.from_pretrained(base).state_dict()
    conv = str(tmp_path / "conv")
    code, _, err = run_cli("convert", base, conv)
    assert code == 0, err
    for where in (conv, base):
        target = tiny_llama(seed=7).state_dict()
        assert not same_bits(target[SOURCE], want[SOURCE])
        result = ckpt.load(target, where, strict=True)
        assert not getattr(result, "missing_keys", [])
        assert all(same_bits(target[k], want[k]) for k in want), where
