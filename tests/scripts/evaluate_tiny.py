"""pass@k of a tiny LaDiR model, for the distributed-evaluation test: `[accelerate launch ...] evaluate_tiny.py OUT`.

Every process builds the same model (fixed seed) and calls `evaluate_pass_at_k(split_across_processes=True)`; the
main process writes the result to OUT/result.json. Run without `accelerate launch`, it is the one-process reference.
"""

import json
import os
import sys

import torch
from accelerate import PartialState

from trl_ladi.evaluation import evaluate_pass_at_k, ladir_generate_fn
from trl_ladi.process_group import end_process_group
from trl_ladi.testing import make_tokenizer, tiny_ladir_model

PROMPTS = ["what is 3 plus 4 ?", "2 + 2 =", "the cat sat on", "a b c", "so we get", "the answer is", "first add",
           "then take"]


def contains_answer(completions, answer, **kwargs):
    return [float(gold in text.split()) for text, gold in zip(completions, answer)]


def main(output_dir):
    state = PartialState(cpu=True)  # gloo processes on the CPU (a trainer's config does this in the examples)
    tokenizer = make_tokenizer()
    model = tiny_ladir_model(tokenizer, seed=0, latent_tokens_per_block=2, latent_dim=8, encoder_lora_rank=4,
                             reasoner_lora_rank=4, max_blocks=2, num_denoise_steps=3)
    torch.nn.init.normal_(model.velocity_head.linear.weight, std=0.1)  # zero-initialised: give it some velocity
    dataset = [{"prompt": prompt, "answer": gold} for prompt, gold in zip(PROMPTS * 2, ["the", "7", "mat", "d"] * 4)]
    generate_fn = ladir_generate_fn(model.eval(), tokenizer, num_decodes_per_latent=2, num_denoise_steps=3,
                                    sde_noise_level=0.7, max_new_tokens=3)
    result = evaluate_pass_at_k(generate_fn, dataset, contains_answer, ks=(1, 2, 4), num_samples=4, batch_size=3,
                                show_progress=False, seed=5, split_across_processes=True)
    if state.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "result.json"), "w") as f:
            json.dump(dict(result, processes=state.num_processes), f)


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group()
