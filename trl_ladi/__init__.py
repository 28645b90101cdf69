"""trl_ladi: LaDi-RL (latent diffusion reasoning RL) on Hugging Face TRL."""

__version__ = "0.1.0"

from trl_ladi.modeling import LaDiRConfig, LaDiRModel
from trl_ladi.pipeline import LaDiRPipeline
from trl_ladi.trainers import LaDiRLConfig, LaDiRLTrainer, LaDiRSFTConfig, LaDiRSFTTrainer

__all__ = [
    "LaDiRConfig",
    "LaDiRModel",
    "LaDiRPipeline",
    "LaDiRLConfig",
    "LaDiRLTrainer",
    "LaDiRSFTConfig",
    "LaDiRSFTTrainer",
]
