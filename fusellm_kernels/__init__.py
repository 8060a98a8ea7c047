"""fusellm-kernels: fast knowledge fusion of LLMs (FuseLLM).

`import fusellm_kernels` needs only torch: Triton, transformers and datasets are imported
where they are used.
"""
from fusellm_kernels.types import FusionLossParts

__version__ = "0.1.0"

__all__ = ["FusionLossParts", "__version__"]
