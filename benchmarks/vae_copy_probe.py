"""What can the VAE decoder read back from a prefix that holds a sentence's tokens, one per slot?

    python benchmarks/vae_copy_probe.py --prefix embeddings --decoder frozen      --steps 20 --learning_rate 1e-2
    python benchmarks/vae_copy_probe.py --prefix embeddings --decoder lora        --steps 30
    python benchmarks/vae_copy_probe.py --prefix bottleneck --decoder lora        --steps 20 --noise_std 0.5
    python benchmarks/vae_copy_probe.py --prefix bottleneck --decoder lora        --steps 20 --noise_std 0.5 --basis vocabulary

The decoder (the base LM, frozen or with a trainable LoRA adapter) reads 16 slots, then a trainable `<ae>` marker
(started as the embedding of "\\n"), and is trained to write the sentence and eos. The slots hold the sentence's token
embeddings (left-padded with the pad token's), either exactly (`--prefix embeddings`) or through a trainable
`hidden -> latent_dim -> hidden` bottleneck started as the principal components of the embeddings of the tokens the
sentences use (`--basis sentences`) or of the whole vocabulary (`--basis vocabulary`), with Gaussian noise on the
latent in training. Prints teacher-forced token accuracy and greedy exact match on held-out sentences. docs/sft.md
reports the four runs above; they motivated `LaDiRConfig(token_aligned_latents=True, vae_decoder_lora_rank=...)`.
"""

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from peft import LoraConfig, get_peft_model
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_ladi.data import load_math_dataset, split_reasoning_into_sentences
from trl_ladi.default_model import default_model_path

NUM_SLOTS = 16


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="Base causal LM (default: embedded SmolLM2-135M).")
    parser.add_argument("--prefix", choices=("embeddings", "bottleneck"), default="bottleneck")
    parser.add_argument("--decoder", choices=("frozen", "lora"), default="lora")
    parser.add_argument("--basis", choices=("sentences", "vocabulary"), default="sentences")
    parser.add_argument("--latent_dim", type=int, default=128)
    parser.add_argument("--noise_std", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def sentences_of(split, num_problems):
    dataset = load_math_dataset("chain_sum", split=split, num_examples=num_problems)
    return [sentence for reasoning in dataset["reasoning"] for sentence in split_reasoning_into_sentences(reasoning)]


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    path = args.model_name_or_path or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    language_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    language_model.requires_grad_(False)
    embeddings = language_model.get_input_embeddings().weight.detach().clone()
    train, test = sentences_of("train", 512), sentences_of("test", 64)[:128]

    marker = torch.nn.Parameter(embeddings[tokenizer("\n")["input_ids"][0]].clone())
    parameters = [marker]
    if args.decoder == "lora":
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        language_model = get_peft_model(language_model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        parameters += [p for name, p in language_model.named_parameters() if "lora_" in name]
        language_model = language_model.base_model.model
    if args.prefix == "bottleneck":
        if args.basis == "sentences":
            token_ids = sorted({i for s in train for i in tokenizer(s)["input_ids"]} | {tokenizer.pad_token_id})
            basis_embeddings = embeddings[token_ids]
        else:
            basis_embeddings = embeddings
        mean = basis_embeddings.mean(0)
        num_components = min(args.latent_dim, basis_embeddings.shape[0] - 1)
        _, _, top = torch.pca_lowrank(basis_embeddings - mean, q=num_components, center=False)
        components = torch.zeros(embeddings.shape[1], args.latent_dim)
        components[:, :num_components] = top
        encoder, decoder = torch.nn.Linear(embeddings.shape[1], args.latent_dim), torch.nn.Linear(args.latent_dim, embeddings.shape[1])
        with torch.no_grad():
            encoder.weight.copy_(components.T)
            encoder.bias.copy_(-(components.T @ mean))
            decoder.weight.copy_(components)
            decoder.bias.copy_(mean)
        parameters += list(encoder.parameters()) + list(decoder.parameters())

    def prefix(slot_ids):
        slots = embeddings[slot_ids]
        if args.prefix == "bottleneck":
            latents = encoder(slots)
            if args.noise_std > 0 and torch.is_grad_enabled():
                latents = latents + args.noise_std * torch.randn_like(latents)
            slots = decoder(latents)
        return torch.cat([slots, marker.expand(slots.shape[0], 1, -1)], 1)

    def batch(sentences):
        ids = [tokenizer(s)["input_ids"][:NUM_SLOTS] for s in sentences]
        slot_ids = torch.tensor([[tokenizer.pad_token_id] * (NUM_SLOTS - len(i)) + i for i in ids])
        targets = [i + [tokenizer.eos_token_id] for i in ids]
        width = max(map(len, targets))
        target_ids = torch.tensor([t + [tokenizer.pad_token_id] * (width - len(t)) for t in targets])
        target_mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in targets])
        return slot_ids, target_ids, target_mask

    def loss_and_accuracy(sentences):
        slot_ids, target_ids, target_mask = batch(sentences)
        inputs = prefix(slot_ids)
        hidden = language_model.model(inputs_embeds=torch.cat([inputs, embeddings[target_ids]], 1)).last_hidden_state
        logits = language_model.lm_head(hidden[:, inputs.shape[1] - 1 : -1])
        token_loss = F.cross_entropy(logits.transpose(1, 2), target_ids, reduction="none")
        loss = (token_loss * target_mask).sum() / target_mask.sum()
        accuracy = ((logits.argmax(-1) == target_ids).float() * target_mask).sum() / target_mask.sum()
        return loss, accuracy

    @torch.no_grad()
    def exact_match(sentences):
        hits = 0
        for start in range(0, len(sentences), 32):
            chunk = sentences[start : start + 32]
            slot_ids, _, _ = batch(chunk)
            output = language_model.generate(
                inputs_embeds=prefix(slot_ids), attention_mask=torch.ones(len(chunk), NUM_SLOTS + 1, dtype=torch.long),
                max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(output, skip_special_tokens=True)
            hits += sum(text.strip() == sentence.strip() for text, sentence in zip(texts, chunk))
        return hits / len(sentences)

    def report(step):
        with torch.no_grad():
            _, accuracy = loss_and_accuracy(test)
        print(f"step {step}: held-out token accuracy {accuracy:.3f}, exact match {exact_match(test):.3f} "
              f"({len(test)} sentences, {time.perf_counter() - start:.0f} s)", flush=True)

    optimizer = torch.optim.Adam(parameters, lr=args.learning_rate)
    start = time.perf_counter()
    report(0)
    for step in range(1, args.steps + 1):
        loss, accuracy = loss_and_accuracy(random.sample(train, args.batch_size))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            print(f"  step {step}: training loss {loss.item():.3f}, token accuracy {accuracy.item():.3f}", flush=True)
            report(step)


if __name__ == "__main__":
    main()
