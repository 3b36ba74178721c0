"""iapt: Instruction-Aware Prompt Tuning (arXiv 2405.18203) for Hugging Face decoder-only models."""

from iapt.backbone import SUPPORTED_LAYER_PATHS
from iapt.config import IAPTConfig
from iapt.generator import PromptGenerator, generator_parameter_count
from iapt.model import IAPTModel, get_iapt_model
from iapt.peft_method import register as _register_with_peft
from iapt.peft_method import register_with_pipelines as _register_with_pipelines
from iapt.rational import RationalActivation

_register_with_peft()  # get_peft_model(model, IAPTConfig()) and PeftModel.from_pretrained know IAPT
_register_with_pipelines()  # pipeline("text-generation", model=IAPTModel(...)) without a warning

__all__ = [
    "IAPTConfig",
    "IAPTModel",
    "PromptGenerator",
    "RationalActivation",
    "SUPPORTED_LAYER_PATHS",
    "generator_parameter_count",
    "get_iapt_model",
]
__version__ = "0.1.0"
