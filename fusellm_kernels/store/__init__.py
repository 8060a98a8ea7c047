"""On-disk stores of the pipeline: record types, manifests and the teacher store.

Only torch, numpy and safetensors are needed here; nothing imports a pipeline stage.
"""
from fusellm_kernels.store.format import StoreEncoding, TeacherStore
from fusellm_kernels.store.manifest import ChecksumError, SettingsMismatchError, StoreError
from fusellm_kernels.store.records import DocFlag, DocIndex, TeacherRecord

__all__ = [
    "ChecksumError",
    "DocFlag",
    "DocIndex",
    "SettingsMismatchError",
    "StoreEncoding",
    "StoreError",
    "TeacherRecord",
    "TeacherStore",
]
