"""Token-aligned latents (`LaDiRConfig.token_aligned_latents`) and the VAE decoder's own adapter (`vae_decoder_lora_rank`)."""

import copy
import sys
from pathlib import Path

import datasets
import pytest
import torch
from test_sft_trainer import (
    ANSWER_TEMPLATE,
    TINY_LADIR_SIZES,
    answer_accuracy,
    chain_rows,
    pretrained_tiny_lm,
    sft_config,
    snapshot,
    unchanged,
)

from trl_ladi.data import split_reasoning_into_sentences
from trl_ladi.modeling import REASONER_ADAPTER, tokenize_prompts
from trl_ladi.pipeline import LaDiRPipeline
from trl_ladi.testing import make_tokenizer, tiny_ladir_model
from trl_ladi.trainers import LaDiRSFTConfig, LaDiRSFTTrainer
from trl_ladi.trainers.sft_trainer import _pad_token_lists

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


def test_the_reasoner_starts_reading_latent_slots_as_the_embeddings_the_encoder_read(trained_vae):
    """After the VAE stage ``reasoner_latent_in(s * mu_j)`` is the least-squares fit of the embedding the encoder read
    at slot ``j``, checked against torch's own least squares, and reads them far better than the decoder's map."""
    model, trainer, tokenizer = trained_vae["model"], trained_vae["trainer"], trained_vae["tokenizer"]
    scale = model.config.latent_scaling_factor
    assert scale != 1.0
    ids, mask = _pad_token_lists(trainer._scaling_sample(), tokenizer.pad_token_id, "left")
    with torch.no_grad():
        mu = model.encode(ids, mask)[0].flatten(0, 1)
        targets = model.token_aligned_slot_embeddings(ids, mask).flatten(0, 1).double()
        reasoner_read = model.reasoner_latent_in(scale * mu).double()
        decoder_read = model.vae_latent_in(mu).double()
    design = torch.cat([scale * mu, torch.ones(len(mu), 1)], 1).double()
    best = design @ torch.linalg.lstsq(design, targets).solution

    def error(read):
        return ((read - targets).norm() / targets.norm()).item()

    assert error(reasoner_read) <= 1.01 * error(best) + 1e-6, (error(reasoner_read), error(best))
    assert error(reasoner_read) < 0.5 * error(decoder_read), (error(reasoner_read), error(decoder_read))


@pytest.mark.parametrize("velocity_parameterization", ["token_posterior", "token_readout"])
def test_the_vae_stage_keeps_a_token_posteriors_codebook(velocity_parameterization, tmp_path):
    """A token posterior's reasoner reads the codebook rows, so its VAE stage trains the encoder and decoder around a
    codebook it leaves as the principal components set it; other models' VAE stages train the projection too."""
    tokenizer = make_tokenizer()
    model = token_aligned_model(tokenizer, velocity_parameterization=velocity_parameterization, vae_decoder_lora_rank=8)
    trainer = LaDiRSFTTrainer(
        model=model, args=sft_config(tmp_path, "vae", max_steps=5, per_device_train_batch_size=8),
        train_dataset=datasets.Dataset.from_dict(chain_rows()), processing_class=tokenizer,
    )
    codebook = snapshot([model.empty_slot_embedding, *model.token_projection.parameters()])  # after the PCA start
    encoder_head = snapshot(model.latent_mean_head.parameters())
    trainer.train()
    assert not unchanged(encoder_head, model.latent_mean_head.parameters())
    kept = unchanged(codebook, [model.empty_slot_embedding, *model.token_projection.parameters()])
    assert kept == (velocity_parameterization == "token_posterior")


def test_a_token_posterior_reasoner_weighs_its_slot_loss_by_the_config(tmp_path):
    """The reasoner stage's loss is slot_token_weight * slot + answer_weight * answer + stop_weight * stop, with the
    weights of its LaDiRSFTConfig; by default the slot loss weighs 3 (docs/sft.md, "the slot loss's weight")."""
    tokenizer = make_tokenizer()
    model = token_aligned_model(tokenizer, velocity_parameterization="token_posterior", initial_noise_scale=1.0)
    model.config.latent_scaling_factor = 2.0  # as a VAE stage sets it (else the trainer warns)
    dataset = datasets.Dataset.from_dict(chain_rows())
    totals = {}
    for weight in (None, 1.0):
        overrides = {} if weight is None else {"slot_token_weight": weight}
        trainer = LaDiRSFTTrainer(model=model, args=sft_config(tmp_path, "reasoner", **overrides),
                                  train_dataset=dataset, processing_class=tokenizer)
        inputs = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            loss, parts = trainer.compute_loss(model, dict(inputs), return_outputs=True)
        args = trainer.args
        expected = (args.slot_token_weight * parts["slot_token_loss"] + args.answer_weight * parts["answer_loss"]
                    + args.stop_weight * parts["stop_loss"])
        torch.testing.assert_close(loss, expected)
        totals[weight] = (loss, parts["slot_token_loss"])
    assert LaDiRSFTConfig.slot_token_weight == 3.0
    (default_loss, slot_loss), (unit_loss, same_slot_loss) = totals[None], totals[1.0]
    torch.testing.assert_close(slot_loss, same_slot_loss)  # the same batch, the same model
    torch.testing.assert_close(default_loss - unit_loss, 2.0 * slot_loss)


def test_a_token_posterior_reasoner_starts_reading_codebook_rows_as_the_token_embeddings(trained_vae):
    """A token posterior's reasoner reads each slot token's codebook row, not the encoder's latent: its input map is
    fitted on those rows (checked against torch's least squares), where the map fitted on the latents misreads them
    (the encoder's contextual part, which the codebook lacks, moved during the VAE stage)."""
    model = copy.deepcopy(trained_vae["model"])
    model.config.velocity_parameterization = "token_posterior"
    trainer, tokenizer = trained_vae["trainer"], trained_vae["tokenizer"]
    sample = trainer._scaling_sample()
    ids, mask = _pad_token_lists(sample, tokenizer.pad_token_id, "left")
    num_slots, eos = model.config.latent_tokens_per_block, model._eos_token_id()
    slot_ids = torch.tensor([s[:num_slots] + [eos] * (num_slots - len(s[:num_slots])) for s in sample])
    with torch.no_grad():
        mu = model.encode(ids, mask)[0]
        weight, bias = trainer._fit_reasoner_input(model, sample, mu)
        targets = model.token_aligned_slot_embeddings(ids, mask).flatten(0, 1).double()
        rows = model.latent_codebook()[slot_ids].flatten(0, 1).double()
    ones = torch.ones(len(rows), 1, dtype=torch.double)
    design = torch.cat([rows, ones], 1)
    read = rows @ weight.double().T + bias.double()
    best = design @ torch.linalg.lstsq(design, targets).solution
    latents = model.config.latent_scaling_factor * mu.flatten(0, 1).double()
    read_by_map_of_latents = design @ torch.linalg.lstsq(torch.cat([latents, ones], 1), targets).solution

    def error(read):
        return ((read - targets).norm() / targets.norm()).item()

    # seeds 0-2: 0.039 / 0.034 / 0.050 against the unridged optimum's 0.039 / 0.033 / 0.049 (the ridge costs up to 2%);
    # read through the map of the latents: 0.36 / 0.52 at seeds 0 / 1
    assert error(read) <= 1.05 * error(best) + 1e-6, (error(read), error(best))
    assert error(read) < 0.5 * error(read_by_map_of_latents), (error(read), error(read_by_map_of_latents))


# ---------------------------------------------------------------------- the token-readout velocity


def test_token_readout_needs_token_aligned_latents():
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match="token_readout.*needs token_aligned_latents=True"):
        tiny_ladir_model(tokenizer, **TINY_LADIR_SIZES, velocity_parameterization="token_readout")
    with pytest.raises(ValueError, match="velocity_parameterization must be one of"):
        token_aligned_model(tokenizer, velocity_parameterization="tokens")


def test_the_codebook_holds_what_a_fresh_encoder_writes_for_each_token_alone():
    tokenizer = make_tokenizer()
    model = token_aligned_model(tokenizer, velocity_parameterization="token_readout").eval()
    model.config.latent_scaling_factor = 2.5
    codebook = model.latent_codebook()
    assert codebook.shape == (len(tokenizer), model.config.latent_dim)
    for token in ("7", "+", "the"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        with torch.no_grad():
            mu, _ = model.encode(torch.tensor([[token_id]]), torch.ones(1, 1, dtype=torch.long))
        # slot 0 holds the token, the other slots are empty: the eos row of the codebook
        torch.testing.assert_close(codebook[token_id], 2.5 * mu[0, 0], rtol=0, atol=1e-5)
        torch.testing.assert_close(codebook[tokenizer.eos_token_id].expand(SLOTS - 1, -1), 2.5 * mu[0, 1:], rtol=0, atol=1e-5)


def test_the_token_readout_velocity_lands_on_its_clean_estimate_and_the_estimate_on_the_predicted_token():
    tokenizer = make_tokenizer()
    model = token_aligned_model(tokenizer, velocity_parameterization="token_readout").double().eval()
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, ["what is 3 + 4 ?"])
    latents = torch.randn(1, 2, SLOTS, model.config.latent_dim, dtype=torch.float64)
    t = torch.tensor([[0.7, 0.2]], dtype=torch.float64)
    with torch.no_grad():
        outputs = model._packed_forward(
            prompt_ids, prompt_mask, latents, torch.ones(1, 2, dtype=torch.long), noisy_latents=latents,
            noisy_timesteps=t, noisy_block_index=torch.arange(2)[None],
        )
        # an Euler step from t to 0 ends at the clean estimate: z_t - t v = z_0 estimate
        torch.testing.assert_close(latents - t[..., None, None] * outputs["velocity"], outputs["clean_latents"])
        # a fresh velocity head adds nothing: the estimate is the expected codebook latent of the slot prediction,
        # computed here by a loop over the vocabulary
        probabilities = outputs["slot_logits"].softmax(-1)
        codebook = model.latent_codebook()
        expected = sum(probabilities[..., v, None] * codebook[v] for v in range(codebook.shape[0]))
        torch.testing.assert_close(outputs["clean_latents"], expected)


def train_reasoner_stage(trained_vae, output_dir, seed, **config) -> dict:
    """The reasoner stage after the token-aligned VAE stage of `trained_vae`, with these `LaDiRConfig` values; the
    answer accuracy of sampled latents on the training prompts before and after, and the logged slot-token losses."""
    model = copy.deepcopy(trained_vae["model"])
    for name, value in config.items():
        setattr(model.config, name, value)
    if model.config.stop_token_id is not None:
        model.stop_head = None  # as a model built with it has none
    tokenizer, rows = trained_vae["tokenizer"], chain_rows()
    before = answer_accuracy(model, tokenizer, rows, seed=seed)
    trainer = LaDiRSFTTrainer(
        model=model,
        # slot loss weight 1, under which the margins noted in the tests below were measured on this tiny task; the
        # default of 3 comes from the real model (docs/sft.md) and gave these tests smaller margins (seeds 0-2 x 1-2
        # threads: answer accuracy rise >= 0.136 token readout, >= 0.173 token posterior)
        args=sft_config(output_dir, "reasoner", num_train_epochs=16, logging_steps=5, seed=seed, slot_token_weight=1.0),
        train_dataset=datasets.Dataset.from_dict(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "slot_token_loss" in entry]
    slot_losses = [entry["slot_token_loss"] for entry in logged]
    after = answer_accuracy(model.eval(), tokenizer, rows, seed=seed)
    print({"answer accuracy, sampled latents": (before, after), "slot token losses": slot_losses})
    return {"before": before, "after": after, "slot_losses": slot_losses, "logged": logged, "trainer": trainer}


@pytest.fixture(scope="module")
def token_readout_reasoner(trained_vae, tmp_path_factory, statistical_seed):
    return train_reasoner_stage(trained_vae, tmp_path_factory.mktemp("reasoner"), statistical_seed,
                                velocity_parameterization="token_readout")


@pytest.mark.statistical
def test_the_token_readout_reasoner_learns_the_slot_tokens_and_the_answers(token_readout_reasoner, margin):
    slot_losses = token_readout_reasoner["slot_losses"]
    assert len(slot_losses) >= 3, slot_losses
    # seeds 0-2 x 1-2 threads (AMD EPYC), 16 epochs (~80 steps): loss ratio <= 0.36, answer accuracy rise >= 0.185
    margin.check("last / first logged slot-token loss", slot_losses[-1] / slot_losses[0], 0.6, "<", context=slot_losses)
    before, after = token_readout_reasoner["before"], token_readout_reasoner["after"]
    margin.check("answer accuracy rise (greedy, 81 training prompts)", after - before, 0.05, ">", context=(before, after))


@pytest.mark.statistical
@pytest.mark.parametrize("reasoner", ["token_readout_reasoner", "token_posterior_reasoner"])
def test_the_denoiser_report_reads_blocks_back_better_from_less_noise(reasoner, request, trained_vae, tmp_path, margin):
    """benchmarks/ladir_quality.py's (b2) on a tiny trained reasoner: the share of each true block's tokens its
    one-step clean estimate recovers, by noise level (a token posterior's rows have no encoder latents: it reads its
    codebook)."""
    model = request.getfixturevalue(reasoner)["trainer"].model.eval()
    rows = datasets.Dataset.from_dict(chain_rows()).select(range(0, 81, 4))
    report = _ladir_quality().denoiser_slot_accuracy(model, trained_vae["tokenizer"], rows, str(tmp_path), noise_levels=(0.1, 1.0))
    assert report["num_blocks"] == 2 * len(rows)
    low_noise, pure_noise = report["token_accuracy"]
    assert all(0 <= value <= 1 for value in report["token_accuracy"] + report["block_exact_match"])
    # seeds 0-4 x 1-2 threads (AMD EPYC): the difference was >= 0.175 (mean 0.25) for token readout, >= 0.171 (mean
    # 0.21) for the token posterior
    margin.check("token accuracy from t = 0.1 minus from t = 1", low_noise - pure_noise, 0.1, ">", context=report)


@pytest.fixture(scope="module")
def token_posterior_reasoner(trained_vae, tmp_path_factory, statistical_seed):
    return train_reasoner_stage(trained_vae, tmp_path_factory.mktemp("posterior"), statistical_seed,
                                velocity_parameterization="token_posterior", initial_noise_scale=1.0)


@pytest.mark.statistical
def test_the_token_posterior_reasoner_learns_slot_tokens_that_its_sampled_latents_answer_from(
    token_posterior_reasoner, margin
):
    """The reasoner stage of a token posterior is next-slot prediction from clean prefixes; nothing else is learnt for
    the denoiser, yet the latents it then samples (slot by slot, exact posterior ODE) answer the training prompts."""
    logged, slot_losses = token_posterior_reasoner["logged"], token_posterior_reasoner["slot_losses"]
    assert len(logged) >= 3 and all("flow_loss" not in entry for entry in logged)
    # it reads its codebook, so the stage runs no encoder pass over the data set
    assert "latents" not in token_posterior_reasoner["trainer"].train_dataset.column_names
    # seeds 0-4 x 1-2 threads (AMD EPYC), 16 epochs: loss ratio <= 0.34, answer accuracy rise >= 0.21 (mean 0.31)
    margin.check("last / first logged slot-token loss", slot_losses[-1] / slot_losses[0], 0.6, "<", context=slot_losses)
    before, after = token_posterior_reasoner["before"], token_posterior_reasoner["after"]
    margin.check("answer accuracy rise (sampled latents, 81 training prompts)", after - before, 0.1, ">",
                 context=(before, after))


@pytest.fixture(scope="module")
def answer_token_stop_reasoner(trained_vae, tmp_path_factory, statistical_seed):
    stop_token_id = trained_vae["tokenizer"].convert_tokens_to_ids(ANSWER_TEMPLATE.split()[0])  # "the"
    return train_reasoner_stage(trained_vae, tmp_path_factory.mktemp("answer-token-stop"), statistical_seed,
                                velocity_parameterization="token_posterior", initial_noise_scale=1.0,
                                stop_token_id=stop_token_id)


@pytest.mark.statistical
def test_a_reasoner_whose_lm_head_decides_when_to_answer_learns_to_stop(answer_token_stop_reasoner, margin):
    """`LaDiRConfig.stop_token_id`: no stop head; the reasoner stage trains the LM head at each block's end to
    predict the next sentence's first token or the answer's first token, and the sampler's stop decision (that
    token's probability) then ends the traces after their two blocks, as the training traces end."""
    stop_losses = [entry["stop_loss"] for entry in answer_token_stop_reasoner["logged"]]
    model = answer_token_stop_reasoner["trainer"].model.eval()
    assert model.stop_head is None and len(stop_losses) >= 3
    # seeds 0-2 x 1-2 threads (AMD EPYC): last stop loss <= 0.012 (mean 0.0096), traces ending after 2 blocks >= 0.975
    # (mean 0.992)
    margin.check("last logged stop loss (stop or not)", stop_losses[-1], 0.1, "<", context=stop_losses)
    rows = chain_rows()
    samples = LaDiRPipeline(model, answer_token_stop_reasoner["trainer"].processing_class).sample_answers(
        rows["prompt"], generator=torch.Generator().manual_seed(0))
    blocks = samples.trace.num_blocks
    margin.check("share of sampled traces that answer after 2 blocks (81 training prompts)",
                 (blocks == 2).float().mean().item(), 0.9, ">", context=blocks.tolist())


def test_latent_blocks_read_back_as_the_tokens_of_their_codebook_rows():
    tokenizer = make_tokenizer()
    model = token_aligned_model(tokenizer).eval()
    sentences = [tokenizer("3 + 4 = 7 .")["input_ids"], tokenizer("12 - 5")["input_ids"]]
    slot_ids = torch.tensor([ids + [tokenizer.eos_token_id] * (SLOTS - len(ids)) for ids in sentences])
    latents = model.latent_codebook()[slot_ids]
    latents = latents + 1e-4 * torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    assert model.read_latent_tokens(latents, tokenizer) == [tokenizer.decode(ids) for ids in sentences]


def test_the_codebook_round_trip_counts_the_slots_whose_rows_collide():
    """benchmarks/ladir_quality.py's (a2): a token posterior's sentences as codebook rows, read back by nearest row.
    With the embedding of `9` made that of `8`, their rows coincide and `9` reads back as `8` (the lower id): the
    scores are those counted from the sentences; a sentence longer than the block is never exact."""
    tokenizer = make_tokenizer()
    model = token_aligned_model(tokenizer, velocity_parameterization="token_posterior").eval()
    eight, nine = tokenizer.convert_tokens_to_ids(["8", "9"])
    assert eight < nine
    with torch.no_grad():
        embeddings = model.language_model.get_input_embeddings().weight
        embeddings[nine] = embeddings[eight]
    sentences = ["3 + 4 = 7 .", "9 + 9 = 18 .", "5 + 4 = 9 .", "1 + 2 + 3 = 6 ."]
    report = _ladir_quality().codebook_round_trip(model, tokenizer, sentences, batch_size=3)

    ids = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in sentences]
    assert [len(row) for row in ids] == [SLOTS, SLOTS, SLOTS, SLOTS + 2]
    nines = sum(row[:SLOTS].count(nine) for row in ids)
    assert nines == 3
    assert report["num_sentences"] == 4
    assert report["token_accuracy"] == pytest.approx(1 - nines / (4 * SLOTS))
    assert report["exact_match"] == pytest.approx(1 / 4)  # the first; the last is cut to the slots


def _ladir_quality():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import ladir_quality

    return ladir_quality


class NextTokenOracle(torch.nn.Module):
    """A stand-in causal LM that predicts the true next token of whatever it reads, except `wrong_token`: where that
    comes next it predicts token 0 instead."""

    def __init__(self, vocab_size: int, wrong_token: int):
        super().__init__()
        self.vocab_size, self.wrong_token = vocab_size, wrong_token
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the scorer a device

    def forward(self, input_ids):
        targets = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
        targets = torch.where(targets == self.wrong_token, torch.zeros_like(targets), targets)
        logits = torch.nn.functional.one_hot(targets, self.vocab_size).float()
        return type("Output", (), {"logits": logits})()


def test_the_text_sft_scorer_counts_the_reasoning_tokens_it_predicts():
    """benchmarks/ladir_quality.py's (d2) scores only the reasoning sentences' tokens: with a model wrong exactly where
    `9` comes next, the token accuracy and sentence exact match are those counted from the sentences themselves."""
    tokenizer = make_tokenizer()
    rows = chain_rows()
    plain = datasets.Dataset.from_dict({**rows, "prompt": [prompt[0]["content"] for prompt in rows["prompt"]]})
    plain = plain.select(range(0, 81, 5))
    nine = tokenizer.convert_tokens_to_ids("9")
    model = NextTokenOracle(len(tokenizer), wrong_token=nine)
    report = _ladir_quality().text_sft_token_accuracy(model, tokenizer, plain)

    sentences = [s for row in plain for s in split_reasoning_into_sentences(row["reasoning"])]
    ids = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in sentences]
    total, nines = sum(map(len, ids)), sum(s.count(nine) for s in ids)
    assert 0 < nines < total  # the prompts and answers hold 9s too: they must not count
    assert report["num_sentences"] == len(sentences) == 2 * len(plain)
    assert report["token_accuracy"] == pytest.approx(1 - nines / total)
    assert report["sentence_exact_match"] == pytest.approx(sum(nine not in s for s in ids) / len(ids))

    with pytest.raises(ValueError, match="conversational=False"):
        _ladir_quality().text_sft_token_accuracy(model, tokenizer, datasets.Dataset.from_dict(rows).select([0]))


@pytest.mark.statistical
def test_the_token_posterior_reports_slot_prediction_and_where_sampled_blocks_go_wrong(
    token_posterior_reasoner, trained_vae, tmp_path, margin
):
    """(b3) and (c2) of benchmarks/ladir_quality.py on a tiny trained token posterior: its stage raises next-slot
    accuracy from the true prefix above the untrained reasoner's, and the breakdown of sampled traces adds up."""
    quality = _ladir_quality()
    tokenizer = trained_vae["tokenizer"]
    rows = datasets.Dataset.from_dict(chain_rows()).select(range(0, 81, 4))
    untrained = copy.deepcopy(trained_vae["model"])
    untrained.config.velocity_parameterization = "token_posterior"
    trained = token_posterior_reasoner["trainer"].model.eval()
    before = quality.slot_prediction_accuracy(untrained, tokenizer, rows, str(tmp_path))
    after = quality.slot_prediction_accuracy(trained, tokenizer, rows, str(tmp_path))
    assert after["num_sentences"] == 2 * len(rows)
    assert all(0 <= after[key] <= 1 for key in ("token_accuracy", "sentence_exact_match", "end_of_sentence_accuracy"))
    assert after["sentence_exact_match"] <= after["token_accuracy"] + 1e-9
    # seeds 0-4 x 1-2 threads (AMD EPYC): the rise was >= 0.50 (mean 0.63)
    margin.check("trained minus untrained next-slot token accuracy", after["token_accuracy"] - before["token_accuracy"],
                 0.2, ">", context=(before, after))

    breakdown = quality.sampled_block_breakdown(trained, tokenizer, rows, num_latents=2, num_denoise_steps=4,
                                                temperature=0.0, max_new_tokens=8)
    assert breakdown["num_traces"] == 2 * len(rows)
    wrong = round((1 - breakdown["blocks_right"]) * breakdown["num_traces"])
    assert sum(breakdown["first_wrong_block"]) == wrong
    with pytest.raises(ValueError, match="token posterior"):
        quality.slot_prediction_accuracy(trained_vae["model"], tokenizer, rows, str(tmp_path))
