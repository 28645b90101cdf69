"""Model card and Hub upload, without network: `HfApi.create_repo` / `upload_folder` are replaced by recorders."""

import json
import os
import shutil

import pytest
import torch
import yaml
from huggingface_hub import HfApi
from safetensors.torch import load_file
from transformers import AutoTokenizer

from trl_ladi import LaDiRLConfig, LaDiRModel, LaDiRPipeline
from trl_ladi.hub import CARD_TAGS, push_ladir_model, write_model_card
from trl_ladi.testing import make_tokenizer, tiny_causal_lm, tiny_ladir_model

REPO_ID = "someone/tiny-ladirl"
METRICS = {"before RL": {"pass@1": 0.25, "pass@8": 0.5}, "after RL": {"pass@1": 0.375, "pass@8": 0.625}}


@pytest.fixture
def tiny():
    tokenizer = make_tokenizer()
    model = tiny_ladir_model(
        tokenizer, seed=0, latent_tokens_per_block=3, latent_dim=8, encoder_lora_rank=4, reasoner_lora_rank=4, max_blocks=2
    )
    torch.nn.init.normal_(model.velocity_head.linear.weight, std=0.1)  # not the all-zero initial head
    return model.eval(), tokenizer


@pytest.fixture
def hub_recorder(monkeypatch, tmp_path):
    """Replaces the Hub calls; `calls` records them and `folder` keeps a copy of what would have been uploaded."""
    record = {"calls": [], "folder": tmp_path / "uploaded"}

    def create_repo(self, repo_id, **kwargs):
        record["calls"].append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        record["calls"].append(("upload_folder", repo_id, kwargs))
        shutil.copytree(folder_path, record["folder"])
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return record


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_push_uploads_model_tokenizer_and_card(tiny, hub_recorder, tmp_path):
    model, tokenizer = tiny
    args = LaDiRLConfig(output_dir=str(tmp_path / "rl"), use_cpu=True, bf16=False, num_decodes_per_latent=3,
                        learning_rate=0.01, report_to="none")
    url = push_ladir_model(
        model, tokenizer, REPO_ID, base_model="tiny-llama", dataset_name="chain_sum", training_args=args,
        metrics=METRICS, private=True,
    )

    assert url == f"https://huggingface.co/{REPO_ID}/commit/0"
    assert [call[:2] for call in hub_recorder["calls"]] == [("create_repo", REPO_ID), ("upload_folder", REPO_ID)]
    assert hub_recorder["calls"][0][2]["private"] is True and hub_recorder["calls"][0][2]["exist_ok"] is True
    folder = hub_recorder["folder"]
    assert sorted(os.listdir(folder)) == [
        "README.md", "chat_template.jinja", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]
    assert json.loads((folder / "config.json").read_text())["model_type"] == "ladir"
    saved = set(load_file(folder / "model.safetensors"))
    assert set(model.state_dict()) - saved == {"language_model.lm_head.weight"}  # tied to the input embeddings

    readme = (folder / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["library_name"] == "trl_ladi"
    assert meta["base_model"] == "tiny-llama"
    assert meta["tags"] == CARD_TAGS
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert "| num_decodes_per_latent | 3 |" in readme
    assert "| learning_rate | 0.01 |" in readme
    assert "| metric | before RL | after RL |" in readme
    assert "| pass@1 | 0.25 | 0.375 |" in readme
    assert f'LaDiRModel.from_pretrained("{REPO_ID}")' in readme


def test_uploaded_folder_loads_with_identical_weights_and_outputs(tiny, hub_recorder):
    model, tokenizer = tiny
    push_ladir_model(model, tokenizer, REPO_ID)
    loaded = LaDiRModel.from_pretrained(hub_recorder["folder"]).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(hub_recorder["folder"])

    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded_tokenizer.pad_token == tokenizer.pad_token and loaded_tokenizer.eos_token == tokenizer.eos_token

    prompts = ["what is 3 plus 4 ?", "the cat sat on"]
    kwargs = dict(num_latents=2, num_decodes_per_latent=2, max_new_tokens=4, sde_noise_level=0.7)
    original = LaDiRPipeline(model, tokenizer).sample_answers(
        prompts, generator=torch.Generator().manual_seed(0), **kwargs
    )
    reloaded = LaDiRPipeline(loaded, loaded_tokenizer).sample_answers(
        prompts, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert torch.equal(original.latents, reloaded.latents)
    assert original.texts == reloaded.texts


def test_card_from_a_settings_dict_and_flat_metrics(tiny, tmp_path):
    model, _ = tiny
    path = write_model_card(
        tmp_path, model, training_args={"num_generations": 8, "latent_policy_parameters": "velocity_head"},
        metrics={"pass@1": 0.5}, hub_model_id=REPO_ID,
    )
    readme = open(path).read()
    assert "base_model" not in front_matter(readme)  # a model built from an in-memory LM records no base name
    assert "| num_generations | 8 |" in readme and "| latent_policy_parameters | velocity_head |" in readme
    assert "| metric | value |" in readme and "| pass@1 | 0.5 |" in readme
    assert readme.count("| --- |") == 2  # the settings and the metrics tables, nothing else


def test_saved_config_records_the_base_hub_id_and_never_a_local_folder(tmp_path):
    """config.json is what `push_to_hub` uploads: it names the base model by its Hub id when that is known (the
    converted default model's folder), and never by a path of the machine that trained it."""
    from trl_ladi.default_model import CONVERSION_MARKER, DEFAULT_GGUF_FILENAME, DEFAULT_MODEL_HUB_ID
    from trl_ladi.modeling import LaDiRConfig

    tokenizer = make_tokenizer()
    base_dir = tmp_path / "base"
    tiny_causal_lm(tokenizer, seed=None).save_pretrained(base_dir)
    sizes = dict(latent_tokens_per_block=3, latent_dim=8, encoder_lora_rank=4, reasoner_lora_rank=4)

    def saved_config(model, name):
        model.save_pretrained(tmp_path / name)
        return (tmp_path / name / "config.json").read_text()

    model = LaDiRModel.from_base(str(base_dir), **sizes)
    assert model.config.base_model_name_or_path is None
    assert str(tmp_path) not in saved_config(model, "plain")

    (base_dir / CONVERSION_MARKER).write_text(json.dumps({"source_file": DEFAULT_GGUF_FILENAME}))
    model = LaDiRModel.from_base(str(base_dir), **sizes)
    assert model.config.base_model_name_or_path == DEFAULT_MODEL_HUB_ID
    text = saved_config(model, "default")
    assert str(tmp_path) not in text and json.loads(text)["base_model_name_or_path"] == DEFAULT_MODEL_HUB_ID
    card = open(write_model_card(tmp_path / "default", model)).read()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card

    # a folder saved elsewhere with a local path in it loses the path when loaded (and so when saved again)
    record = json.loads(text)
    record["base_model_name_or_path"] = record["text_config"]["_name_or_path"] = "/home/someone/.cache/base"
    (tmp_path / "default" / "config.json").write_text(json.dumps(record))
    config = LaDiRConfig.from_pretrained(tmp_path / "default")
    assert config.base_model_name_or_path is None and "/home/someone" not in config.to_json_string()


class _WritesAFileWhenUnpickled:
    """A pickle payload that runs code: unpickling it writes `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (_write_marker, (self.path,))


def _write_marker(path):
    with open(path, "w") as marker:
        marker.write("code ran")


def test_pickle_only_folders_are_refused_without_being_unpickled(tiny, tmp_path):
    model, tokenizer = tiny
    marker = tmp_path / "code_ran"
    pickled = tmp_path / "pickled-ladir"
    model.save_pretrained(pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({"payload": _WritesAFileWhenUnpickled(marker)}, pickled / "pytorch_model.bin")
    base = tmp_path / "pickled-base"
    base.mkdir()
    model.config.text_config.save_pretrained(base)
    shutil.copy(pickled / "pytorch_model.bin", base / "pytorch_model.bin")

    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\).*save_pretrained"):
        LaDiRModel.from_pretrained(pickled)
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\)"):
        LaDiRModel.from_base(base)
    model.save_pretrained(tmp_path / "safe")
    with pytest.raises(ValueError, match="never runs code from a model folder"):
        LaDiRModel.from_pretrained(tmp_path / "safe", trust_remote_code=True)
    assert not marker.exists()
    # the payload is live: unpickling it without the check would have run its code
    torch.load(pickled / "pytorch_model.bin", weights_only=False)
    assert marker.read_text() == "code ran"
