"""titans-hf: Titans (Behrouz, Zhong, Mirrokni 2024) as a native Hugging Face Transformers model."""

from .neural_memory import NeuralMemory, NeuralMemoryState

__version__ = "0.1.0"

__all__ = ["NeuralMemory", "NeuralMemoryState", "__version__"]
