"""trl_ladi: LaDi-RL (latent diffusion reasoning RL) on Hugging Face TRL."""

__version__ = "0.1.0"

from trl_ladi.modeling import LaDiRConfig, LaDiRModel

__all__ = ["LaDiRConfig", "LaDiRModel"]
