"""The one error type of the PEFT I/O layer.

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
