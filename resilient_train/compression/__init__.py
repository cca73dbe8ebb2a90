"""Compression of pseudo-gradients: the `Codec` protocol, pure-torch reference codecs, and the
loader of the compiled kernels (``resilient_train/csrc/``). Never imports checkpoint or storage."""

from __future__ import annotations

from .codecs import CODEC_NAMES, Codec, Encoded, get_codec

__all__ = ["Codec", "Encoded", "CODEC_NAMES", "get_codec"]
