"""`LaDiRSFTTrainer`: the two supervised LaDiR stages that turn a causal LM into a latent reasoner.

Both stages read rows of `prompt`, `reasoning` and `answer` (or a GSM8K-style `solution`), and cut the reasoning into
sentences, one latent block each.

* `stage="vae"` trains the β-VAE (encoder adapter, query tokens, heads, decoder input map) on single sentences:
  the encoder reads a sentence, possibly with some tokens replaced by random ones; the frozen base LM reconstructs
  the clean sentence from a noisy sample of the latent block. At the end, `latent_scaling_factor = 1 / std(mu)` is
  measured on training sentences and written into the model config, so the reasoner sees unit-variance latents.
* `stage="reasoner"` trains the diffusion reasoner (reasoner adapter and heads) with teacher forcing: every row's
  blocks are encoded once before training (`scaling_factor * mu`, no gradient), then each step scores flow matching
  on those latents, the answer tokens after them, and the stop head ("another block" or "answer"). A token posterior
  (`velocity_parameterization="token_posterior"`) reads its slot tokens' codebook latents instead: no encoder pass.
"""

import contextlib
import logging
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass

import datasets
import torch
from transformers import PreTrainedTokenizerBase, Trainer
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import pad

from trl_ladi.cpu_memory import keep_freed_memory
from trl_ladi.cpu_threads import use_available_cores
from trl_ladi.data import prepare_cot_dataset, split_reasoning_into_sentences
from trl_ladi.modeling import LaDiRModel, check_tokenizer, tokenize_prompts
from trl_ladi.pipeline import LaDiRPipeline
from trl_ladi.trainers.checkpoints import resolve_resume_from_checkpoint
from trl_ladi.trainers.sft_config import LaDiRSFTConfig

STAGE_METRICS = {
    "vae": ("reconstruction_loss", "kl", "token_accuracy"),
    "reasoner": ("flow_loss", "answer_loss", "stop_loss", "slot_token_loss"),
    "rollout": ("flow_loss", "answer_loss", "stop_loss", "slot_token_loss"),
}
NUM_SUMMARY_EXAMPLES = 2
# A reasoner stage whose stop loss ends above this has not learned when to stop writing blocks. Measured on the main
# job's LaDiR start (SmolLM2-135M, chain_sum, 80 reasoner steps): the starts that ended at 0.10 and 0.34 reached 5.5%
# and 4.7% pass@1; 16 others (init seeds x stop weights 2, 4 and 8) ended at 0.033 or below and reached 37-57%.
STOP_LOSS_WARNING_THRESHOLD = 0.05

logger = logging.getLogger(__name__)


def _pad_token_lists(sequences: list[list[int]], pad_token_id: int, padding_side: str):
    """Token id lists -> padded ``(B, S)`` ids and their attention mask."""
    ids = pad([torch.tensor(sequence, dtype=torch.long) for sequence in sequences], pad_token_id, padding_side)
    mask = pad([torch.ones(len(sequence), dtype=torch.long) for sequence in sequences], 0, padding_side)
    return ids, mask


def slot_token_ids(sentence_ids: list[list[int]], num_slots: int, eos_token_id: int) -> torch.Tensor:
    """``(N, num_slots)``: what each token-aligned slot of these sentences holds, the sentence's first ``num_slots``
    tokens and then eos (the empty slot)."""
    return torch.tensor([ids[:num_slots] + [eos_token_id] * (num_slots - len(ids[:num_slots])) for ids in sentence_ids])


@dataclass
class DataCollatorForSentenceVAE:
    """Batches single sentences for the VAE stage.

    The encoder reads the sentences left-padded (its query tokens follow the last real token); the decoder's target
    is the sentence + eos, right-padded.
    """

    pad_token_id: int
    eos_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        sentences = [list(example["sentence_ids"]) for example in examples]
        sentence_ids, sentence_mask = _pad_token_lists(sentences, self.pad_token_id, "left")
        targets = [sentence + [self.eos_token_id] for sentence in sentences]
        target_ids, target_mask = _pad_token_lists(targets, self.pad_token_id, "right")
        return {"sentence_ids": sentence_ids, "sentence_mask": sentence_mask, "target_ids": target_ids, "target_mask": target_mask}


@dataclass
class DataCollatorForLatentReasoner:
    """Batches traces for the reasoner stage: prompt, the encoded latent blocks (a token-posterior model's rows have
    only their slot tokens), and the answer.

    Prompts are tokenized here with `tokenize_prompts`, exactly as the sampler tokenizes them (chat template with a
    generation prompt for conversations), and left-padded; the blocks of a batch are zero-padded to its longest trace
    (`block_mask` marks the real ones); answers are right-padded.
    """

    tokenizer: PreTrainedTokenizerBase
    max_prompt_length: int | None = None

    def __call__(self, examples: list[dict]) -> dict:
        prompt_ids, prompt_mask = tokenize_prompts(self.tokenizer, [example["prompt"] for example in examples])
        if self.max_prompt_length is not None:  # keep the end: the question and the generation prompt
            prompt_ids, prompt_mask = prompt_ids[:, -self.max_prompt_length :], prompt_mask[:, -self.max_prompt_length :]
        answer_ids, answer_mask = _pad_token_lists(
            [list(example["answer_ids"]) for example in examples], self.tokenizer.pad_token_id, "right"
        )
        batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "answer_ids": answer_ids, "answer_mask": answer_mask}
        blocks = None
        if "latents" in examples[0]:  # a token-posterior model's rows have none: it reads its codebook
            blocks = [torch.as_tensor(example["latents"], dtype=torch.float32) for example in examples]
            batch["latents"] = pad(blocks, 0.0)
        if "slot_token_ids" in examples[0]:  # token-aligned models: each slot's token (padding blocks are masked)
            slot_ids = [torch.as_tensor(example["slot_token_ids"], dtype=torch.long) for example in examples]
            batch["slot_token_ids"] = pad(slot_ids, self.tokenizer.eos_token_id)
            if blocks is None:
                blocks = slot_ids
        batch["block_mask"] = pad([torch.ones(len(row), dtype=torch.long) for row in blocks], 0)
        return batch


def answer_start_token_id(tokenizer, answer_template: str, answer: str = "0") -> int:
    """The first token of `answer` written with `answer_template` (`"#### {answer}"`: `####`), the
    `LaDiRConfig.stop_token_id` of a model whose LM head decides when to answer."""
    return tokenizer(answer_template.format(answer=answer), add_special_tokens=False)["input_ids"][0]


def check_stop_token(model: LaDiRModel, tokenizer, answer_template: str):
    """A model whose LM head decides when to answer (`LaDiRConfig.stop_token_id`) predicts the answer's first token at
    each block's end: every answer must start with that token."""
    stop_token_id = model.config.stop_token_id
    if stop_token_id is None:
        return
    starts = {answer_start_token_id(tokenizer, answer_template, answer) for answer in ("0", "42", "-7", "x")}
    if starts != {stop_token_id}:
        raise ValueError(
            f"The model's stop_token_id is {stop_token_id} ({tokenizer.convert_ids_to_tokens(stop_token_id)!r}), but "
            f"answers written with answer_template={answer_template!r} start with the tokens "
            f"{tokenizer.convert_ids_to_tokens(sorted(starts))}. The reasoner learns to stop by predicting the answer's "
            "first token: build the model with stop_token_id set to the first token of the template's fixed start "
            "(e.g. tokenizer.convert_tokens_to_ids('####') for '#### {answer}'), or with stop_token_id=None."
        )


class LaDiRSFTTrainer(Trainer):
    """Trainer for the supervised LaDiR stages (`args.stage`: `"vae"`, then `"reasoner"`).

    Args:
        model ([`LaDiRModel`]): e.g. `LaDiRModel.from_base("base-lm-dir")`. Only the stage's parameters are trained
            (`model.train_only(...)`); everything else is frozen.
        args ([`LaDiRSFTConfig`], *optional*): the stage and its settings.
        train_dataset (`datasets.Dataset`): rows with `prompt` (a string or chat messages) and `reasoning` + `answer`,
            or a GSM8K-style `solution` (`"steps ... #### 42"`); see `trl_ladi.data.prepare_cot_dataset`.
        eval_dataset (`datasets.Dataset` or `dict[str, datasets.Dataset]`, *optional*): same columns; evaluation
            logs the stage's losses.
        processing_class (`PreTrainedTokenizerBase`): the base model's tokenizer (needs pad and eos tokens).
        callbacks (`list[TrainerCallback]`, *optional*): as in [`~transformers.Trainer`].
        optimizers (`tuple`, *optional*): as in [`~transformers.Trainer`].
    """

    # compute_loss returns a per-batch mean, so training_step divides it by the gradient accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: LaDiRModel,
        args: LaDiRSFTConfig | None = None,
        train_dataset: datasets.Dataset | None = None,
        eval_dataset: datasets.Dataset | dict[str, datasets.Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        callbacks=None,
        optimizers=(None, None),
    ):
        use_available_cores()  # under accelerate launch on a CPU: the cores, not the one thread it sets
        keep_freed_memory()  # on a CPU: reuse the memory a step frees instead of mapping it afresh
        if not isinstance(model, LaDiRModel):
            raise TypeError(
                f"LaDiRSFTTrainer trains a LaDiRModel, got {type(model).__name__}. Wrap your causal LM first: "
                "`model = LaDiRModel.from_base('base-model-dir')`."
            )
        if processing_class is None:
            raise ValueError("Pass the base model's tokenizer as `processing_class=`.")
        check_tokenizer(processing_class)
        if train_dataset is None:
            raise ValueError("LaDiRSFTTrainer needs a `train_dataset` with prompt, reasoning and answer columns.")
        args = args or LaDiRSFTConfig()
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

        if args.stage == "vae":
            model.train_only(model.vae_parameters())
            # encoder inputs are corrupted with ordinary tokens, never with pad/eos/chat markers
            special_ids = set(processing_class.all_special_ids)
            vocab_size = min(len(processing_class), model.config.text_config.vocab_size)
            self._substitution_token_ids = torch.tensor([i for i in range(vocab_size) if i not in special_ids])
            data_collator = DataCollatorForSentenceVAE(processing_class.pad_token_id, processing_class.eos_token_id)
        else:
            model.train_only(model.reasoner_parameters())
            if model.config.latent_scaling_factor == 1.0:
                warnings.warn(
                    "model.config.latent_scaling_factor is 1.0, its value before any VAE stage. Train the VAE first "
                    "(LaDiRSFTConfig(stage='vae')), which sets it so the reasoner sees unit-variance latents.",
                    stacklevel=2,
                )
            check_stop_token(model, processing_class, args.answer_template)
            # the encoder runs once over the whole dataset here (a token posterior skips it), on the training device
            model.to(args.device)
            data_collator = DataCollatorForLatentReasoner(processing_class, args.max_prompt_length)

        def prepare(dataset):
            return self._prepare_dataset(dataset, model, processing_class, args)

        train_dataset = prepare(train_dataset)
        if args.stage == "vae" and model.config.token_aligned_latents and model.config.latent_scaling_factor == 1.0:
            # no VAE stage has trained this model yet: start its latent maps from the tokens its sentences use
            used = {token for ids in train_dataset["sentence_ids"] for token in ids} | {processing_class.eos_token_id}
            model.init_token_aligned_maps(sorted(used))
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: prepare(dataset) for name, dataset in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = prepare(eval_dataset)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        # the columns the collator reads, so that `remove_unused_columns=True` keeps them too
        self._signature_columns = list(train_dataset.column_names)

    # ------------------------------------------------------------------ data

    @staticmethod
    def _prepare_dataset(dataset, model: LaDiRModel, tokenizer, args: LaDiRSFTConfig) -> datasets.Dataset:
        """Validate the rows and build the stage's columns: one row per sentence (VAE) or per trace (reasoner)."""
        dataset = prepare_cot_dataset(dataset)  # names missing columns and invalid rows
        sentences = [
            split_reasoning_into_sentences(reasoning, max_sentences=model.config.max_blocks)
            for reasoning in dataset["reasoning"]
        ]
        flat_sentences = [sentence for row in sentences for sentence in row]
        max_length = args.max_sentence_length
        if model.config.token_aligned_latents:  # one slot per token: a longer sentence cannot be encoded whole
            max_length = min(max_length, model.config.latent_tokens_per_block)
        all_ids = tokenizer(flat_sentences, add_special_tokens=False)["input_ids"]
        num_cut = sum(len(ids) > max_length for ids in all_ids)
        if num_cut and model.config.token_aligned_latents:
            warnings.warn(
                f"{num_cut} of {len(all_ids)} reasoning sentences are longer than latent_tokens_per_block="
                f"{model.config.latent_tokens_per_block} tokens and were cut to it (token-aligned latents hold one "
                "token per slot). Build the model with more latent tokens per block to keep them whole.",
                stacklevel=3,
            )
        flat_ids = [ids[:max_length] for ids in all_ids]
        if args.stage == "vae":
            return datasets.Dataset.from_dict({"sentence_ids": flat_ids})

        blocks_per_row = [len(row) for row in sentences]
        answer_texts = [args.answer_template.format(answer=answer) for answer in dataset["answer"]]
        answer_ids = [
            ids[: args.max_answer_length - 1] + [tokenizer.eos_token_id]
            for ids in tokenizer(answer_texts, add_special_tokens=False)["input_ids"]
        ]
        columns = {"prompt": dataset["prompt"], "answer_ids": answer_ids}
        if model.config.token_aligned_latents:
            # what each slot holds: the sentence's tokens, then eos (the token-readout velocity learns to predict them)
            num_slots = model.config.latent_tokens_per_block
            slot_ids = slot_token_ids(flat_ids, num_slots, tokenizer.eos_token_id)
            columns["slot_token_ids"] = [row.numpy() for row in slot_ids.split(blocks_per_row)]
        if model.config.velocity_parameterization == "token_posterior":
            # its reasoner reads the slot tokens' codebook latents, never the encoder's: no encoder pass (measured: the
            # pass over 2048 problems took ~4 min on 2 cores, longer than the stage's own training budget)
            return datasets.Dataset.from_dict(columns)
        with full_parameters(model):
            block_latents = model.config.latent_scaling_factor * encode_sentences(
                model, flat_ids, tokenizer.pad_token_id, args.per_device_eval_batch_size
            )
        columns["latents"] = [row.numpy() for row in block_latents.split(blocks_per_row)]
        prepared = datasets.Dataset.from_dict(columns)
        return prepared.with_format("torch", columns=["latents"], output_all_columns=True)

    # ------------------------------------------------------------------ loss and metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        if args.stage == "vae":
            if model.training and args.token_substitution_prob > 0:
                inputs["sentence_ids"] = self._substitute_tokens(inputs["sentence_ids"], inputs["sentence_mask"])
            outputs = model(
                task="vae",
                **inputs,
                kl_weight=args.kl_weight,
                latent_noise_std=args.latent_noise_std if model.training else 0.0,
            )
        else:
            outputs = model(
                task="reasoner",
                latents=inputs.pop("latents", None),  # a token-posterior model's batches have none
                **inputs,
                flow_weight=args.flow_weight,
                answer_weight=args.answer_weight,
                stop_weight=args.stop_weight,
                prompt_dropout=args.prompt_dropout if model.training else 0.0,
                rollout_denoise_steps=args.rollout_denoise_steps if args.stage == "rollout" else 0,
                slot_token_weight=args.slot_token_weight,
                timestep_shift=args.flow_timestep_shift,
            )
        mode = "train" if model.training else "eval"
        for name in STAGE_METRICS[args.stage]:
            if name in outputs:  # slot_token_loss: token-readout models only
                self._metrics[mode][name].append(self.accelerator.gather(outputs[name]).mean().item())
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def _substitute_tokens(self, sentence_ids: torch.Tensor, sentence_mask: torch.Tensor) -> torch.Tensor:
        """Replace a `token_substitution_prob` fraction of the real encoder tokens by random vocabulary tokens."""
        candidates = self._substitution_token_ids.to(sentence_ids.device)
        substitute = (torch.rand(sentence_ids.shape, device=sentence_ids.device) < self.args.token_substitution_prob)
        substitute &= sentence_mask.bool()
        random_ids = candidates[torch.randint(len(candidates), sentence_ids.shape, device=sentence_ids.device)]
        return torch.where(substitute, random_ids, sentence_ids)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The model returns losses, not logits: evaluation reports the stage's loss and metrics.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Average the metrics of the logging window, as TRL's trainers do.
        mode = "train" if self.model.training else "eval"
        metrics = {name: sum(values) / len(values) for name, values in self._metrics[mode].items() if values}
        if mode == "eval":
            metrics = {f"eval_{name}": value for name, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()

    # ------------------------------------------------------------------ the stage as a whole

    def train(self, resume_from_checkpoint=None, **kwargs):
        start = time.time()
        resume_from_checkpoint = resolve_resume_from_checkpoint(resume_from_checkpoint, self.args.output_dir)
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        # The model is called outside its forward below: gather DeepSpeed ZeRO-3 parameters for that (every process).
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as model:
            if self.args.stage == "vae":
                sample = self._scaling_sample()
                mu = encode_sentences(model, sample, self.processing_class.pad_token_id, self.args.per_device_eval_batch_size)
                # latent_scaling_factor = 1 / std(mu), so the reasoner works on unit-variance latents
                self.model.config.latent_scaling_factor = 1.0 / mu.std().clamp(min=1e-6).item()
                if self.model.config.token_aligned_latents:
                    reasoner_input_map = self._fit_reasoner_input(model, sample, mu)
            summary = self._stage_summary(model, time.time() - start)
        if self.args.stage == "vae" and self.model.config.token_aligned_latents:
            self._warm_start_reasoner_input(*reasoner_input_map)
        if self.args.stage == "vae":
            self.log({"latent_scaling_factor": self.model.config.latent_scaling_factor})
        if self.is_world_process_zero():
            print(summary)
            warning = self._stop_head_warning()
            if warning:
                logger.warning(warning)
        return output

    def _stop_head_warning(self) -> str | None:
        """A warning when a reasoner (or rollout) stage ended with its stop head still unsure when to answer."""
        stop_losses = [entry["stop_loss"] for entry in self.state.log_history if "stop_loss" in entry]
        if self.args.stage == "vae" or not stop_losses or stop_losses[-1] <= STOP_LOSS_WARNING_THRESHOLD:
            return None
        return (
            f"The {self.args.stage} stage ended with a stop loss of {stop_losses[-1]:.3f} (last logged; above "
            f"{STOP_LOSS_WARNING_THRESHOLD}): the stop head has not learned when to stop writing latent blocks and "
            "answer, so the model will often answer after the wrong block. (On the main job, starts that ended at "
            "0.10 and 0.34 reached 5.5% and 4.7% pass@1, those at 0.033 or below 37-57%; 120 steps instead of 80 "
            "left one such start at 0.12.) Raise `stop_weight` (examples/math.py uses 4), train the stage longer, or "
            "start again from another seed."
        )

    @torch.no_grad()
    def _fit_reasoner_input(self, model: LaDiRModel, sample: list[list[int]], mu: torch.Tensor):
        """Token-aligned latents: the affine map ``W x + b`` that reads each scaled latent slot ``x = s * mu_j`` of the
        scaling sample's sentences (``mu`` ``(N, L, D)``, raw) as the embedding the encoder read at that slot (the
        token's, or the empty slot's), by least squares (a small ridge keeps it defined when the slots span fewer
        than ``D`` directions). Returns ``W`` ``(H, D)`` and ``b`` ``(H,)``. A token posterior's reasoner reads the
        slots' codebook latents instead of ``mu``, so for it ``x`` is the codebook row of the slot's token.

        The trained ``vae_latent_in`` is not that map: the VAE decoder's adapter learns to read it, so the base LM
        that the reasoner runs would read distorted embeddings (measured on SmolLM2-135M after 97 VAE steps: relative
        error ``|vae_latent_in(mu) - e| / |e|`` 4.7 over 10k slots, 0.01 with this fit; docs/sft.md)."""
        ids, mask = _pad_token_lists(sample, self.processing_class.pad_token_id, "left")
        targets = model.token_aligned_slot_embeddings(ids.to(model.device), mask.to(model.device))
        if model.config.velocity_parameterization == "token_posterior":
            # its blocks are codebook rows, one token per slot (what it trains on and samples), not the encoder's
            # latents, whose contextual part the codebook lacks (read through a map fitted on the latents, SmolLM2-135M's
            # digit rows were 42-90% off their embeddings in reproduce run 3's model; docs/sft.md)
            slot_ids = slot_token_ids(sample, model.config.latent_tokens_per_block, model._eos_token_id())
            latents = model.latent_codebook()[slot_ids.to(model.device)].flatten(0, 1).cpu().double()
        else:
            latents = (model.config.latent_scaling_factor * mu).flatten(0, 1).double()
        inputs = torch.cat([latents, torch.ones(len(latents), 1, dtype=latents.dtype)], 1)
        gram = inputs.T @ inputs
        ridge = 1e-4 * gram.diagonal().mean()
        solution = torch.linalg.solve(
            gram + ridge * torch.eye(len(gram), dtype=gram.dtype), inputs.T @ targets.flatten(0, 1).cpu().double()
        )  # (D + 1, H)
        return solution[:-1].T.float(), solution[-1].float()

    @torch.no_grad()
    def _warm_start_reasoner_input(self, weight: torch.Tensor, bias: torch.Tensor):
        """Token-aligned latents: ``reasoner_latent_in`` becomes the fitted map, so the reasoner starts reading a
        (scaled) latent block as the embeddings of the sentence's tokens, as the base LM reads text."""
        model = self.model
        with full_parameters(model, modified_on_rank=0, parameters=list(model.reasoner_latent_in.parameters())):
            model.reasoner_latent_in.weight.copy_(weight.to(model.reasoner_latent_in.weight))
            model.reasoner_latent_in.bias.copy_(bias.to(model.reasoner_latent_in.bias))

    def _scaling_sample(self) -> list[list[int]]:
        """A seeded sample of the training sentences (the same on every process)."""
        sentence_ids = self.train_dataset["sentence_ids"]
        generator = torch.Generator().manual_seed(self.args.seed)
        sample = torch.randperm(len(sentence_ids), generator=generator)[: self.args.scaling_num_sentences].tolist()
        return [list(sentence_ids[i]) for i in sample]

    def _stage_summary(self, model: LaDiRModel, seconds: float) -> str:
        """A few lines for the console: how the stage's metrics moved, and what the model now does on examples."""
        stage = self.args.stage
        lines = [f"LaDiR {stage} stage: {self.state.global_step} steps in {seconds:.0f} s."]
        for name in STAGE_METRICS[stage]:
            values = [entry[name] for entry in self.state.log_history if name in entry]
            if values:
                lines.append(f"  {name}: {values[0]:.4f} (first logged) -> {values[-1]:.4f} (last logged)")
        tokenizer = self.processing_class
        was_training = model.training
        model.eval()
        if stage == "vae":
            lines.append(f"  latent_scaling_factor = {model.config.latent_scaling_factor:.4f} (written to the model config)")
            sentences = [list(ids) for ids in self.train_dataset["sentence_ids"][:NUM_SUMMARY_EXAMPLES]]
            mu = encode_sentences(model, sentences, tokenizer.pad_token_id, NUM_SUMMARY_EXAMPLES)
            reconstructions = model.decode_latents_to_text(mu.to(model.device) * model.config.latent_scaling_factor, tokenizer)
            for ids, reconstruction in zip(sentences, reconstructions):
                lines.append(f"  sentence {tokenizer.decode(ids)!r} -> latent block -> {reconstruction!r}")
        else:
            prompts = self.train_dataset["prompt"][:NUM_SUMMARY_EXAMPLES]
            samples = LaDiRPipeline(model, tokenizer).sample_answers(prompts, temperature=0.0)
            for row, (prompt, answer) in enumerate(zip(prompts, samples.texts)):
                num_blocks = int(samples.trace.num_blocks[row])
                if model.config.velocity_parameterization == "token_posterior":  # its slots are codebook rows
                    reading, thoughts = "slot tokens", model.read_latent_tokens(samples.latents[row, :num_blocks], tokenizer)
                else:
                    reading, thoughts = "VAE-decoded", model.decode_latents_to_text(samples.latents[row, :num_blocks], tokenizer)
                question = prompt if isinstance(prompt, str) else prompt[-1]["content"]
                lines.append(f"  prompt {question!r}\n    thoughts ({reading}): {thoughts}\n    answer: {answer!r}")
        model.train(was_training)
        return "\n".join(lines)


def full_parameters(model: torch.nn.Module, modified_on_rank: int | None = None, parameters=None):
    """A context in which a model that an earlier DeepSpeed ZeRO-3 run partitioned has its full parameters again
    (e.g. the VAE stage's model handed to the reasoner stage); a no-op for an ordinary model. With
    `modified_on_rank`, what that process writes into `parameters` (default: all) is kept and shared on exit."""
    parameters = list(model.parameters()) if parameters is None else parameters
    if not any(hasattr(parameter, "ds_id") for parameter in parameters):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=modified_on_rank)


@torch.no_grad()
def encode_sentences(model: LaDiRModel, sentence_ids: list[list[int]], pad_token_id: int, batch_size: int) -> torch.Tensor:
    """The VAE means `mu` ``(N, L, D)`` (raw, unscaled; on the CPU) of tokenized sentences, in batches."""
    was_training = model.training
    model.eval()
    means = []
    for start in range(0, len(sentence_ids), batch_size):
        ids, mask = _pad_token_lists(sentence_ids[start : start + batch_size], pad_token_id, "left")
        mu, _ = model.encode(ids.to(model.device), mask.to(model.device))
        means.append(mu.float().cpu())
    model.train(was_training)
    return torch.cat(means) if means else torch.zeros(0, model.config.latent_tokens_per_block, model.config.latent_dim)
