"""fusellm-kernels: fast knowledge fusion of LLMs (FuseLLM).

`import fusellm_kernels` needs only torch: Triton, transformers and datasets are imported
where they are used.
"""
import os as _os
import sys as _sys


def _find_training_in_checkout() -> None:
    """`fusellm_kernels.training` is the repository's top-level training/ folder: pyproject's
    package-dir installs it there; a checkout used without installing (PYTHONPATH=the
    repository, as bench/gpu_check.sh runs it) or a second worktree beside an editable
    install finds its own folder through this finder. An installed copy has the subpackage
    itself and no pyproject.toml beside it, so it never uses the finder."""
    import importlib.abc
    import importlib.util

    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    folder = _os.path.join(root, "training")
    if _os.path.isdir(_os.path.join(here, "training")) or not (
        _os.path.isfile(_os.path.join(folder, "train.py")) and _os.path.isfile(_os.path.join(root, "pyproject.toml"))
    ):
        return
    name = __name__ + ".training"

    class CheckoutTraining(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
            if fullname != name:
                return None
            return importlib.util.spec_from_file_location(
                fullname, _os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])

    _sys.meta_path.insert(0, CheckoutTraining())


_find_training_in_checkout()

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
