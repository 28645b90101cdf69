"""Model cards and Hub uploads for LaDi-RL models.

```python
from trl_ladi.hub import push_ladir_model

push_ladir_model(model, tokenizer, "you/ladirl-chain-sum", dataset_name="chain_sum", training_args=trainer.args,
                 metrics={"before RL": {"pass@1": 0.31}, "after RL": {"pass@1": 0.36}})
```

The uploaded folder is what `LaDiRModel.from_pretrained` reads (config.json with `model_type: ladir`,
model.safetensors), the base model's tokenizer, and a README.md model card. The config records the base model's Hub
id when it is known (`LaDiRModel.from_base` does; the default model's is HuggingFaceTB/SmolLM2-135M-Instruct) and
never a local folder.
"""

import os
import tempfile
from dataclasses import asdict

from huggingface_hub import HfApi, ModelCardData

from trl_ladi.default_model import base_model_hub_id

CARD_TAGS = ["trl", "ladi-rl", "latent-reasoning"]
# The LaDiRLConfig fields shown in the card's settings table, when a whole config is given.
LADIRL_CARD_SETTINGS = (
    "num_generations",
    "num_decodes_per_latent",
    "num_denoise_steps",
    "sde_noise_level",
    "train_timestep_fraction",
    "latent_utility",
    "latent_policy_parameters",
    "learning_rate",
    "denoiser_learning_rate",
    "latent_kl_beta",
    "text_policy_coef",
    "cfg_scale",
    "diversity_guidance_scale",
    "epsilon",
    "scale_rewards",
    "temperature",
    "max_completion_length",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "seed",
)


def _settings(training_args) -> dict:
    """The LaDi-RL settings to show: a `LaDiRLConfig` is cut down to `LADIRL_CARD_SETTINGS`, a dict is kept whole."""
    if training_args is None:
        return {}
    if isinstance(training_args, dict):
        return dict(training_args)
    values = training_args.to_dict() if hasattr(training_args, "to_dict") else asdict(training_args)
    return {name: values[name] for name in LADIRL_CARD_SETTINGS if name in values}


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "`None`" if value is None else str(value)


def _metrics_table(metrics: dict) -> list[str]:
    """`{column: {metric: value}}` (e.g. before/after RL) or a flat `{metric: value}` -> markdown table lines."""
    if all(not isinstance(value, dict) for value in metrics.values()):
        metrics = {"value": metrics}
    columns = list(metrics)
    names = list(dict.fromkeys(name for values in metrics.values() for name in values))
    lines = ["| metric | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for name in names:
        cells = [_format_value(metrics[column].get(name)) for column in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_model_card(
    save_directory,
    model,
    *,
    base_model: str | None = None,
    dataset_name: str | None = None,
    training_args=None,
    metrics: dict | None = None,
    hub_model_id: str | None = None,
    license: str = "apache-2.0",
) -> str:
    """Write a README.md model card for a LaDiR / LaDi-RL model into `save_directory`; returns its path.

    Args:
        save_directory: the folder of the saved model.
        model (`LaDiRModel`): the model (its config fills the model section).
        base_model (`str`, *optional*): the base LM's Hub id; defaults to `model.config.base_model_name_or_path`.
            A local folder is not shown (see `trl_ladi.default_model.base_model_hub_id`).
        dataset_name (`str`, *optional*): the training data.
        training_args (`LaDiRLConfig` or `dict`, *optional*): the LaDi-RL settings; a config is shown through the
            fields in `LADIRL_CARD_SETTINGS`, a dict as given.
        metrics (`dict`, *optional*): `{column: {metric: value}}`, e.g.
            `{"before RL": {"pass@1": 0.31}, "after RL": {"pass@1": 0.36}}`, or a flat `{metric: value}`.
        hub_model_id (`str`, *optional*): the repository id used in the loading example.
        license (`str`, defaults to `"apache-2.0"`): the license of the weights (the base model's; SmolLM2's is
            Apache-2.0).
    """
    config = model.config
    # the card's `base_model` is a Hub id; a local folder means nothing to readers
    base_model = base_model_hub_id(base_model or getattr(config, "base_model_name_or_path", None))
    repo = hub_model_id or "path/to/this/model"
    card_data = ModelCardData(
        library_name="trl_ladi",
        base_model=base_model,
        tags=CARD_TAGS,
        pipeline_tag="text-generation",
        license=license,
        datasets=[dataset_name] if dataset_name and "/" in dataset_name else None,
    )
    lines = [
        "---",
        card_data.to_yaml(),
        "---",
        "",
        f"# {repo.split('/')[-1]}",
        "",
        "A latent diffusion reasoning model trained with LaDi-RL "
        "([Latent Diffusion Reasoning Prevents Entropy Collapse in Reinforcement Learning](https://arxiv.org/abs/2602.01705)) "
        "using trl_ladi, an extension of Hugging Face TRL. A diffusion policy samples blocks of latent "
        "\"thought\" tokens; the language model then decodes the answer from the prompt and those latents. "
        "Reinforcement learning trained the diffusion policy on the rewards of the decoded answers.",
        "",
        "## Model",
        "",
        f"- Base model: {f'`{base_model}`' if base_model else 'not recorded'} "
        f"({config.text_config.model_type}, {config.text_config.num_hidden_layers} layers, hidden size "
        f"{config.text_config.hidden_size}), held once and shared by the VAE, the reasoner and the answer decoder.",
        f"- Latent blocks: {config.latent_tokens_per_block} tokens of size {config.latent_dim} per reasoning "
        f"sentence, at most {config.max_blocks} blocks, {config.num_denoise_steps} denoising steps per block, "
        f"latent scaling factor {config.latent_scaling_factor:.4g}.",
        f"- LoRA ranks: encoder {config.encoder_lora_rank}, reasoner {config.reasoner_lora_rank}.",
        "",
        "## Data",
        "",
        f"Trained on {f'`{dataset_name}`' if dataset_name else 'data that was not recorded'}.",
        "",
    ]
    settings = _settings(training_args)
    if settings:
        lines += ["## LaDi-RL settings", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {name} | {_format_value(value)} |" for name, value in settings.items()]
        lines.append("")
    if metrics:
        lines += ["## Results", "", *_metrics_table(metrics), ""]
    lines += [
        "## How to use",
        "",
        "```python",
        "from transformers import AutoTokenizer",
        "from trl_ladi import LaDiRModel, LaDiRPipeline",
        "",
        f'model = LaDiRModel.from_pretrained("{repo}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        "pipeline = LaDiRPipeline(model, tokenizer)",
        'messages = [{"role": "user", "content": "What is 12 + 7 - 5?"}]',
        "# 4 latent reasoning traces, each decoded into 2 answers",
        "samples = pipeline.sample_answers([messages], num_latents=4, num_decodes_per_latent=2,",
        "                                  max_new_tokens=32, temperature=0.7)",
        "print(samples.texts)",
        "# the first trace's latent blocks shown as text by the VAE decoder",
        "blocks = samples.latents[0, : int(samples.trace.num_blocks[0])]",
        "print(model.decode_latents_to_text(blocks, tokenizer))",
        "```",
        "",
    ]
    path = os.path.join(save_directory, "README.md")
    with open(path, "w", encoding="utf-8") as card_file:
        card_file.write("\n".join(lines))
    return path


def push_ladir_model(
    model,
    tokenizer,
    repo_id: str,
    *,
    base_model: str | None = None,
    dataset_name: str | None = None,
    training_args=None,
    metrics: dict | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload LaDi-RL model",
) -> str:
    """Save `model`, its `tokenizer` and a model card to a temporary folder and upload it to the Hub repo `repo_id`
    (created if needed). The card arguments are `write_model_card`'s. Returns the URL of the commit."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_model_card(
            folder,
            model,
            base_model=base_model,
            dataset_name=dataset_name,
            training_args=training_args,
            metrics=metrics,
            hub_model_id=repo_id,
        )
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, repo_type="model")
    return str(commit)
