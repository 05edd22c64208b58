"""Drop-in modules built on stfast's fused ops (state-dict compatible with the reference ports)."""

from .himnet import HimDecoder, HimEncoder, HimGCN, HimGCRU, HimNet

__all__ = ["HimNet", "HimGCN", "HimGCRU", "HimEncoder", "HimDecoder"]
