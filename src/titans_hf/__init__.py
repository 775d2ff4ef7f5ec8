"""titans-hf: Titans (Behrouz, Zhong, Mirrokni 2024) as a native Hugging Face Transformers model.

Importing the package registers ``TitansConfig`` with ``AutoConfig``, ``TitansModel`` with ``AutoModel``,
``TitansForCausalLM`` with ``AutoModelForCausalLM`` and the task heads with ``AutoModelForSequenceClassification``,
``AutoModelForTokenClassification`` and ``AutoModelForQuestionAnswering``; saved models also carry the code
(``auto_map``) so that they load with ``trust_remote_code=True`` where the package is not installed.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from . import modeling_titans
from .cache_titans import TitansCache
from .configuration_titans import TitansConfig
from .conversion_titans import BASE_LORA_TARGETS, MEMORY_MODULES, mark_only_memory_as_trainable
from .modeling_titans import (  # noqa: F401 (exported through modeling_titans.__all__)
    TitansForCausalLM,
    TitansForQuestionAnswering,
    TitansForSequenceClassification,
    TitansForTokenClassification,
    TitansModel,
    TitansPreTrainedModel,
)
from .neural_memory import NeuralMemory, NeuralMemoryState

__version__ = "0.1.0"

AutoConfig.register(TitansConfig.model_type, TitansConfig, exist_ok=True)
AutoModel.register(TitansConfig, TitansModel, exist_ok=True)
AutoModelForCausalLM.register(TitansConfig, TitansForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(TitansConfig, TitansForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(TitansConfig, TitansForTokenClassification, exist_ok=True)
AutoModelForQuestionAnswering.register(TitansConfig, TitansForQuestionAnswering, exist_ok=True)
# Saved folders carry the code files and an `auto_map`, for `trust_remote_code=True` loading without the package.
TitansConfig.register_for_auto_class()
TitansModel.register_for_auto_class("AutoModel")
TitansForCausalLM.register_for_auto_class("AutoModelForCausalLM")
TitansForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
TitansForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
TitansForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")

__all__ = [
    "BASE_LORA_TARGETS",
    "MEMORY_MODULES",
    "NeuralMemory",
    "NeuralMemoryState",
    "TitansCache",
    "TitansConfig",
    "mark_only_memory_as_trainable",
    *modeling_titans.__all__,
    "__version__",
]
