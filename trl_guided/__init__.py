"""trl-guided: Guided GRPO for Hugging Face TRL."""

__version__ = "0.1.0"

__all__ = ["GuidedGRPOConfig", "GuidedGRPOTrainer", "__version__"]


def __getattr__(name: str):
    """`GuidedGRPOConfig` and `GuidedGRPOTrainer` load on first use, so that importing the package (the `trl-guided`
    command does) does not load torch and TRL."""
    if name == "GuidedGRPOConfig":
        from .config import GuidedGRPOConfig  # on demand: loads torch and TRL

        return GuidedGRPOConfig
    if name == "GuidedGRPOTrainer":
        from .trainer import GuidedGRPOTrainer  # on demand: loads torch and TRL

        return GuidedGRPOTrainer
    raise AttributeError(f"module 'trl_guided' has no attribute {name!r}")
