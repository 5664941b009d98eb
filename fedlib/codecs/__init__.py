"""Update codecs: what shrinks a client's delta before it is sealed (and the aggregator's change
before it is broadcast), and grows it back after.

Codecs stack in the configured order, inside the encrypted envelope: tensor codecs, found by
name in a registry (`base.codecs`, as strategies are), then `zstd` over the serialised bytes.

- `fp16`, `bf16` (`cast`): half-precision floats, 2× fewer bytes.
- `int8` (`int8`): a fp32 scale per row, about 4×.
- `int4`, `int2`, `sign` (`lowbit`): block codes with bf16 scales, 4.25, 2.25 and 1.06 bits per entry.
- `topk` (`topk`): the largest entries of each tensor, with one-byte index gaps.
- `zstd`: lossless compression of the whole serialised payload (`chain`).

Error feedback (Seide et al., 2014; Karimireddy et al., 2019) is the client's business: what a
lossy chain dropped this round is added back to the next round's delta (`fedlib.round.client`).
"""

from fedlib.codecs import cast, int8, lowbit, topk  # noqa: F401  (they register themselves)
from fedlib.codecs.base import CodecOptions, SizeBound, TensorCodec, codecs
from fedlib.codecs.chain import ZSTD, CodecChain, parse_description, tensor_codec

TENSOR_CODECS = tuple(codecs.items)
CODECS = (*TENSOR_CODECS, ZSTD)

__all__ = [
    "CODECS",
    "TENSOR_CODECS",
    "CodecChain",
    "CodecOptions",
    "SizeBound",
    "TensorCodec",
    "codecs",
    "parse_description",
    "tensor_codec",
]
