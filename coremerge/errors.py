"""The error type of the PEFT I/O layer (and its one refinement: an input that changed while it was read).

Example:
    >>> str(AdapterError("adapter 'a/': module 'q_proj':\\n  lora_B has 3 columns, expected 4"))
    "adapter 'a/': module 'q_proj': lora_B has 3 columns, expected 4"
"""

from __future__ import annotations


class AdapterError(ValueError):
    """Bad input: the message is ONE line naming the adapter (path or hub id), the module/tensor when
    relevant, and what was expected.

    Whitespace runs (newlines included, e.g. from a wrapped library error) collapse to one space, so
    the message is always a single line. It is a ``ValueError``: callers that catch bad user input
    catch it too.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class AdapterChangedError(AdapterError):
    """An input file changed while it was read (or between two reads of one run): what was built from it
    mixes versions and is not kept. Running again reads the new version whole.

    Example:
        >>> isinstance(AdapterChangedError("adapter 'a/': adapter_model.safetensors changed"), ValueError)
        True
    """
