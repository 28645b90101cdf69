"""Trainers: the supervised LaDiR stages, and the LaDi-RL trainer."""

from trl_ladi.trainers.ladirl_config import LaDiRLConfig
from trl_ladi.trainers.ladirl_trainer import LaDiRLTrainer
from trl_ladi.trainers.sft_config import LaDiRSFTConfig
from trl_ladi.trainers.sft_trainer import LaDiRSFTTrainer

__all__ = ["LaDiRLConfig", "LaDiRLTrainer", "LaDiRSFTConfig", "LaDiRSFTTrainer"]
