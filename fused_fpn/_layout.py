"""The output memory-format rule shared by every backend (and by the C++ kernels)."""
import torch


def is_channels_last_like(t: torch.Tensor) -> bool:
    """A 4-D tensor counts as channels_last when its channel stride is smaller than its width
    stride. Must stay identical to ``is_channels_last_like`` in csrc/lateral_common.h."""
    return t.stride(1) < t.stride(3)


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of ``lateral(x, ...)``'s output: x's (channels_last or contiguous)."""
    return torch.channels_last if is_channels_last_like(x) else torch.contiguous_format
