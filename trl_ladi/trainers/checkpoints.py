"""Resuming from the last checkpoint that was written completely.

`transformers` picks the checkpoint folder with the highest step number, also one whose writing was cut short (the
process killed while saving it), and then fails inside the load. The trainers here resume from the newest checkpoint
whose `trainer_state.json` (written last, after the weights, optimizer, scheduler and RNG states) is present and
parses, and say which newer folders they skipped. Nothing is deleted.
"""

import json
import logging
import os
import re

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def is_complete_checkpoint(path: str) -> bool:
    """Whether a checkpoint folder holds a trainer state that parses (the last file a checkpoint save writes)."""
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME)) as state_file:
            json.load(state_file)
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` folder of `output_dir` that was written completely, or None.

    Incomplete newer folders are reported in a warning and left on disk.
    """
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(match.group(1)), name)
        for name in os.listdir(output_dir)
        if (match := _CHECKPOINT_NAME.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    skipped = []
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        if is_complete_checkpoint(path):
            if skipped:
                logger.warning(
                    "Resuming from %s: the newer %s %s no valid %s (a save that was interrupted) and %s skipped; "
                    "it is left on disk, delete it once you no longer need it.",
                    path, ", ".join(skipped), "has" if len(skipped) == 1 else "have", TRAINER_STATE_NAME,
                    "is" if len(skipped) == 1 else "are",
                )
            return path
        skipped.append(name)
    if skipped:
        raise ValueError(
            f"resume_from_checkpoint=True, but no checkpoint in {output_dir} was written completely ({', '.join(skipped)} "
            f"lack a valid {TRAINER_STATE_NAME}: their saves were interrupted). Start without resume_from_checkpoint, "
            "or pass the path of a complete checkpoint."
        )
    return None


def resolve_resume_from_checkpoint(resume_from_checkpoint, output_dir: str):
    """`True` -> the last complete checkpoint (or `True` again when there is none, so transformers says so)."""
    if resume_from_checkpoint is True:
        return last_complete_checkpoint(output_dir) or True
    return resume_from_checkpoint
