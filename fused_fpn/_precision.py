"""Whether fp32 convolutions may run on TF32 tensor cores: the one switch eager conv2d follows."""
import torch


def conv_allows_tf32() -> bool:
    """True when eager ``F.conv2d`` on fp32 CUDA tensors may use TF32: since torch 2.9
    ``torch.backends.cudnn.conv.fp32_precision == "tf32"`` (the setting as resolved through
    ``torch.backends.cudnn.fp32_precision`` and ``torch.backends.fp32_precision``, what the C++ query
    ``allowTF32CuDNN(Float32Op::CONV)`` reads), before it ``torch.backends.cudnn.allow_tf32``.
    The legacy getter raises once the new per-op API has set conv and RNN differently (e.g. after
    ``torch.backends.cudnn.conv.fp32_precision = "ieee"``), so it is read only where the new API is absent."""
    precision = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if precision is None:
        return bool(torch.backends.cudnn.allow_tf32)
    return precision == "tf32"
