"""trl-guided: Guided GRPO for Hugging Face TRL."""

__version__ = "0.1.0"

from .config import GuidedGRPOConfig  # noqa: E402
from .trainer import GuidedGRPOTrainer  # noqa: E402

__all__ = ["GuidedGRPOConfig", "GuidedGRPOTrainer", "__version__"]
