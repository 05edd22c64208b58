"""Faithful pure-PyTorch ports of the published modules: the correctness oracle."""

from .himnet import HimDecoder, HimEncoder, HimGCN, HimGCRU, HimNet

__all__ = ["HimNet", "HimGCN", "HimGCRU", "HimEncoder", "HimDecoder"]
