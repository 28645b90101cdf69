"""Token-aligned latents (`LaDiRConfig.token_aligned_latents`) and the VAE decoder's own adapter (`vae_decoder_lora_rank`)."""

import datasets
import pytest
import torch
from test_sft_trainer import TINY_LADIR_SIZES, chain_rows, pretrained_tiny_lm, sft_config, snapshot, unchanged

from trl_ladi.modeling import REASONER_ADAPTER
from trl_ladi.testing import make_tokenizer, tiny_ladir_model
from trl_ladi.trainers import LaDiRSFTTrainer

SLOTS = 6  # the tiny chain sentences ("3 + 4 = 7 .") have 6 tokens


def token_aligned_model(tokenizer, language_model=None, **options):
    sizes = dict(TINY_LADIR_SIZES, latent_tokens_per_block=SLOTS, token_aligned_latents=True)
    sizes.update(options)
    return tiny_ladir_model(tokenizer, language_model=language_model, seed=0 if language_model is None else None, **sizes)


def test_slot_j_holds_token_j_and_a_fresh_latent_maps_back_to_its_embedding():
    tokenizer = make_tokenizer()
    model = token_aligned_model(tokenizer).eval()
    short, long = tokenizer("3 + 4")["input_ids"], tokenizer("12 - 5 = 7 .")["input_ids"]
    ids = torch.tensor([[tokenizer.pad_token_id] * (len(long) - len(short)) + short, long])
    mask = torch.tensor([[0] * (len(long) - len(short)) + [1] * len(short), [1] * len(long)])
    model.init_token_aligned_maps(long + short + [tokenizer.eos_token_id])
    with torch.no_grad():
        mu, _ = model.encode(ids, mask)
        embeddings = model.language_model.get_input_embeddings().weight
        # a fresh model: the encoder's contextual part is zero, so slot j is the projection of token j's embedding
        assert torch.allclose(mu[0, : len(short)], model.token_projection(embeddings[short]), atol=1e-5)
        assert torch.allclose(mu[0, len(short) :], model.token_projection(model.empty_slot_embedding).expand(SLOTS - len(short), -1), atol=1e-5)
        assert torch.allclose(mu[1, : len(long)], model.token_projection(embeddings[long]), atol=1e-5)
        # the padding of a batch does not move a sentence's slots
        alone, _ = model.encode(torch.tensor([short]), torch.ones(1, len(short), dtype=torch.long))
        assert torch.allclose(alone[0], mu[0], atol=1e-5)
        # the decoder's input map starts as the projection's inverse: with fewer tokens than latent numbers, every
        # latent of these tokens reads back as its token's embedding
        assert torch.allclose(model.vae_latent_in(mu[1, : len(long)]), embeddings[long], atol=1e-4)
        # and the empty slot as the eos embedding
        assert torch.allclose(model.empty_slot_embedding, embeddings[tokenizer.eos_token_id])


def test_sentences_longer_than_the_slots_are_cut_with_a_warning(tmp_path):
    tokenizer = make_tokenizer()
    model = token_aligned_model(tokenizer, latent_tokens_per_block=4)
    dataset = datasets.Dataset.from_dict({"prompt": ["what is 3 + 4 ?"], "solution": ["3 + 4 = 7 .\n7 .\n#### 7"]})
    with pytest.warns(UserWarning, match="1 of 2 reasoning sentences are longer than latent_tokens_per_block=4"):
        trainer = LaDiRSFTTrainer(model=model, args=sft_config(tmp_path, "vae"), train_dataset=dataset, processing_class=tokenizer)
    assert [tokenizer.decode(ids) for ids in trainer.train_dataset["sentence_ids"]] == ["3 + 4 =", "7 ."]


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory, statistical_seed):
    tokenizer = make_tokenizer()
    rows = chain_rows()
    language_model = pretrained_tiny_lm(tokenizer, rows, seed=statistical_seed)
    model = token_aligned_model(tokenizer, language_model=language_model, vae_decoder_lora_rank=8, initial_latent_logvar=-4.0)
    base_weights = [p for n, p in model.language_model.named_parameters() if "lora_" not in n]
    watched = {
        "base": snapshot(base_weights),
        "reasoner adapter": snapshot(model.adapter_parameters(REASONER_ADAPTER)),
        "decoder adapter": snapshot(model.adapter_parameters("vae_decoder")),
    }
    dataset = datasets.Dataset.from_dict(rows)
    trainer = LaDiRSFTTrainer(
        model=model,
        args=sft_config(tmp_path_factory.mktemp("vae"), "vae", num_train_epochs=6, per_device_train_batch_size=8,
                        token_substitution_prob=0.0, latent_noise_std=0.0, seed=statistical_seed),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
    )
    before = trainer.evaluate()["eval_token_accuracy"]
    trainer.train()
    after = trainer.evaluate()["eval_token_accuracy"]
    return {"model": model.eval(), "tokenizer": tokenizer, "trainer": trainer, "before": before, "after": after,
            "watched": watched, "base_weights": base_weights}


def test_the_vae_stage_trains_the_decoder_adapter_and_leaves_the_base_and_reasoner_alone(trained_vae):
    model, watched = trained_vae["model"], trained_vae["watched"]
    assert unchanged(watched["base"], trained_vae["base_weights"])
    assert unchanged(watched["reasoner adapter"], model.adapter_parameters(REASONER_ADAPTER))
    assert not unchanged(watched["decoder adapter"], model.adapter_parameters("vae_decoder"))


@pytest.mark.statistical
def test_the_vae_stage_teaches_the_decoder_adapter_to_read_token_aligned_latents(trained_vae, margin):
    # teacher-forced token accuracy on the 81 rows' 162 sentences (~1100 tokens). Seed 0: 0.17 before, 0.81 after 6
    # epochs (~120 steps); this 2-layer LM copies less well than SmolLM2-135M, which reads 96% of held-out chain_sum
    # sentences back exactly after 20 steps (docs/sft.md)
    margin.check("token accuracy before the VAE stage", trained_vae["before"], 0.4, "<")
    margin.check("token accuracy after the VAE stage", trained_vae["after"], 0.6, ">")


def test_the_reasoner_starts_reading_latents_as_the_vae_decoder_does(trained_vae):
    model = trained_vae["model"]
    scale = model.config.latent_scaling_factor
    assert scale != 1.0
    latents = torch.randn(3, SLOTS, model.config.latent_dim)
    with torch.no_grad():
        assert torch.allclose(model.reasoner_latent_in(scale * latents), model.vae_latent_in(latents), atol=1e-4)
