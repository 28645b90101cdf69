"""LaDi-RL on code generation (HumanEval), end to end, with the pipeline of `examples/math.py`.

A demonstration of the pipeline on code, not a competitive setup. HumanEval has no worked solutions, so:
- the answer the reasoner learns to write is the `canonical_solution` (the function body);
- its "reasoning" is the function's docstring without its examples, cut into sentences (one latent block each);
- the reward is `code_execution_reward`: the completed function runs against HumanEval's tests in a sandbox.
The 164 problems are split once, deterministically (`--seed`), into `--num_test_examples` test problems and the
rest for training. The prompt is the instruction and the function's signature and docstring, without chat template.

A small run (tiny stages, 8 test problems); it took 9 min 22 s on 2 shared CPU cores, most of it the 10 reasoner
steps (244 s: HumanEval prompts and solutions are long), and scored 0% pass@k before and after RL:

    accelerate launch examples/code.py --vae_steps 10 --reasoner_steps 10 --max_steps 2 --num_test_examples 8 \
        --eval_num_samples 4 --eval_ks 1 2 4 --max_completion_length 64

Every flag of `examples/math.py` works here too (`--ladir_model_path`, `--push_to_hub`, the `LaDiRLConfig` fields).
`--dataset_name` is `humaneval` or a data file / saved dataset with HumanEval's columns (`prompt`, `test`,
`entry_point`, `canonical_solution`, and optionally `code_prompt`).
"""

# This file shares its name with the standard library's `code`: keep its folder off the import path.
import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import ast
import importlib.util


from trl_ladi.data import load_humaneval_dataset, load_user_dataset, split_reasoning_into_sentences
from trl_ladi.process_group import end_process_group
from trl_ladi.rewards import code_execution_reward

# The pipeline (stages, evaluation, saving, Hub push) is the one of examples/math.py.
_spec = importlib.util.spec_from_file_location("ladirl_math_example", os.path.join(os.path.dirname(__file__), "math.py"))
math_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(math_example)

HUMANEVAL_COLUMNS = ("prompt", "test", "entry_point", "canonical_solution")
INSTRUCTION = "Complete the body of this Python function."
CODE_DEFAULTS = {
    "output_dir": "outputs/ladirl-code",
    "dataset_name": "humaneval",
    "num_test_examples": 32,
    "answer_template": "{answer}",  # the body, which the code reward appends to the function's signature
    "max_completion_length": 128,
    # HumanEval's docstring sentences run far past 16 tokens: LaDiR's query-token latents and learnt velocity
    "token_aligned_latents": False,
    "latent_tokens_per_block": 4,
    "velocity_parameterization": "direct",
    "vae_decoder_lora_rank": 0,
    "token_substitution_prob": 0.3,
    "initial_noise_scale": None,  # the model config's (LaDiR: 2)
    # 2 prompts x 8 latents a step (math.py's 1 x 16 is measured on chain_sum; a code latent's decodes can differ)
    "num_generations": 8,
    "latent_policy_parameters": "velocity_head",
    "learning_rate": 1e-4,
    "vae_steps": 80,
    "reasoner_steps": 50,
    "sft_learning_rate": 5e-4,
}


def docstring_reasoning(code_prompt: str, entry_point: str, max_sentences: int) -> str:
    """The docstring of `entry_point` without its examples (`>>>`, "Example"), one sentence per line."""
    try:
        functions = [
            node for node in ast.walk(ast.parse(code_prompt)) if isinstance(node, ast.FunctionDef) and node.name == entry_point
        ]
        docstring = ast.get_docstring(functions[0]) if functions else None
    except SyntaxError:
        docstring = None
    text = docstring or code_prompt
    kept = []
    for line in text.splitlines():
        if line.strip().startswith(">>>") or line.strip().lower().startswith(("example", "for example")):
            break
        kept.append(line.strip())
    sentences = split_reasoning_into_sentences(" ".join(kept) or text, max_sentences=max_sentences)
    return "\n".join(sentences)


def load_code_data(script_args, seed: int):
    if script_args.dataset_name == "humaneval":
        dataset = load_humaneval_dataset(conversational=False, instruction=INSTRUCTION)
    else:
        dataset = load_user_dataset(script_args.dataset_name)
        missing = [column for column in HUMANEVAL_COLUMNS if column not in dataset.column_names]
        if missing:
            raise ValueError(
                f"{script_args.dataset_name} is missing the column(s) {missing} (it has {dataset.column_names}). "
                f"A code dataset needs HumanEval's columns {list(HUMANEVAL_COLUMNS)}; rename yours with "
                "dataset.rename_column."
            )
    code_prompts = dataset["code_prompt"] if "code_prompt" in dataset.column_names else dataset["prompt"]
    reasonings = [
        docstring_reasoning(code_prompt, entry_point, script_args.max_blocks)
        for code_prompt, entry_point in zip(code_prompts, dataset["entry_point"])
    ]
    dataset = dataset.add_column("reasoning", reasonings).add_column("answer", dataset["canonical_solution"])
    splits = dataset.train_test_split(test_size=script_args.num_test_examples, seed=seed)
    train = splits["train"].select(range(min(script_args.num_train_examples, len(splits["train"]))))
    return train, splits["test"]


def main(script_args, training_args):
    train_dataset, test_dataset = load_code_data(script_args, training_args.seed)
    return math_example.run(
        script_args, training_args, train_dataset, test_dataset, code_execution_reward, task="code"
    )


def make_parser(**defaults):
    return math_example.make_parser(**{**CODE_DEFAULTS, **defaults})


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
    end_process_group()
