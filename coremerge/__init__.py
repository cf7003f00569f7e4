"""coremerge: merge many LoRA adapters into one in Core Space.

The math (tensors in, tensors out)::

    from coremerge import LoraFactors, CoreSpace, merge_module
    merged = merge_module(factors, method="tsv", space="core", alpha=0.9)   # LowRank(b, a)

Whole PEFT adapter directories::

    from coremerge import MergeOptions, merge_to_dir
    merge_to_dir(["adapters/snli", "adapters/mnli"], "merged/", MergeOptions(method="ties"))

``import coremerge`` never imports ray or pyarrow (the pipeline does).
"""

__version__ = "0.1.0"

from coremerge.basis import Basis, reference_basis  # noqa: E402  (after __version__: merge reads it)
from coremerge.merge import MergeOptions, merge_to_dir
from coremerge.methods import METHODS, check_params, get_method
from coremerge.project import project
from coremerge.reconstruct import to_lowrank
from coremerge.spaces import SPACES, CoreSpace, merge_module, module_generator
from coremerge.types import LoraFactors, LowRank

__all__ = [
    "Basis", "CoreSpace", "LoraFactors", "LowRank", "METHODS", "SPACES", "MergeOptions", "check_params",
    "get_method", "merge_module", "merge_to_dir", "module_generator", "project", "reference_basis",
    "to_lowrank", "__version__",
]

