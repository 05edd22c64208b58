"""Drop-in modules built on stfast's fused ops (state-dict compatible with the reference ports)."""

from .himnet import HimDecoder, HimEncoder, HimGCN, HimGCRU, HimNet
from .stlora import NALL, NSP, STLoRA

__all__ = ["HimNet", "HimGCN", "HimGCRU", "HimEncoder", "HimDecoder", "NALL", "NSP", "STLoRA"]
