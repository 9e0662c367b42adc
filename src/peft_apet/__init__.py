"""peft-apet: Arbitrary Parameter-Efficient Tuning (APET) as a Hugging Face PEFT method.

`import peft_apet` registers the "APET" PEFT type; then `peft.get_peft_model(model, APETConfig...)` and the
rest of PEFT's API work with APET adapters.
"""

from .calibration import calibrate_masks
from .config import AdapterPart, APETConfig, APETPart, BiasPart, DeltaPart, LoraPart, PromptPart
from .export import export_lora
from .layer import APETLayer, Linear, OutputLayer, PromptEmbedding
from .masked_weight import MaskedWeight
from .masks import adjacent_mask, discrete_mask
from .model import APETModel
from .plan import AdapterPlan, count_trainable_parameters, plan_adapter
from .registration import is_registered, register_apet
from .strategies import register_mask_strategy

__version__ = "0.2.0.dev0"

register_apet()

__all__ = [
    "APETConfig",
    "APETLayer",
    "APETModel",
    "APETPart",
    "AdapterPart",
    "AdapterPlan",
    "BiasPart",
    "DeltaPart",
    "Linear",
    "LoraPart",
    "MaskedWeight",
    "OutputLayer",
    "PromptPart",
    "PromptEmbedding",
    "__version__",
    "adjacent_mask",
    "calibrate_masks",
    "count_trainable_parameters",
    "discrete_mask",
    "export_lora",
    "is_registered",
    "plan_adapter",
    "register_apet",
    "register_mask_strategy",
]
