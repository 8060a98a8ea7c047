"""fusellm-kernels: fast knowledge fusion of LLMs (FuseLLM).

`import fusellm_kernels` needs only torch: Triton, transformers and datasets are imported
where they are used.
"""
from fusellm_kernels.functional import fusion_loss, gather_teacher_rows
from fusellm_kernels.fused_linear import fused_linear_fusion_loss
from fusellm_kernels.losses import FusedLinearFusionLoss, FusionHead, FusionLoss
from fusellm_kernels.types import FusionLossParts
from fusellm_kernels.validation import FusionInputError

__version__ = "0.1.0"

__all__ = [
    "FusedLinearFusionLoss",
    "FusionHead",
    "FusionInputError",
    "FusionLoss",
    "FusionLossParts",
    "__version__",
    "fused_linear_fusion_loss",
    "fusion_loss",
    "gather_teacher_rows",
]
