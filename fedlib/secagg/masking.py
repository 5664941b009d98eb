"""Pairwise masks: seeds from X25519, streams from AES-256-CTR (a CSPRNG), signs by client order."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlib.secagg.fixedpoint import MODULUS, Tensors


def pairwise_seed(private: X25519PrivateKey, peer_public: X25519PublicKey, context: bytes) -> bytes:
    """Both ends of a pair derive the same seed; `context` (federation, round) makes it per round."""
    shared = private.exchange(peer_public)
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"fedlib/secagg/mask/v1/" + context).derive(shared)


def mask_stream(seed: bytes, template: Tensors) -> Tensors:
    """Uniform residues mod 2^32 shaped like `template`, tensors taken in sorted-name order so
    that every party expands the same seed into the same masks."""
    sizes = {name: template[name].numel() for name in sorted(template)}
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
    stream = np.frombuffer(encryptor.update(b"\x00" * (4 * sum(sizes.values()))), dtype="<u4")
    out, offset = {}, 0
    for name, size in sizes.items():
        chunk = stream[offset : offset + size].astype(np.int64)
        out[name] = torch.from_numpy(chunk).view(template[name].shape)
        offset += size
    return out


def _sign(me: str, peer: str) -> int:
    return 1 if me < peer else -1


def apply_masks(
    encoded: Tensors, me: str, my_private: X25519PrivateKey, peer_publics: Mapping[str, X25519PublicKey], context: bytes
) -> Tensors:
    """encoded + Σ_peers ±PRG(s_me,peer) mod 2^32."""
    out = {name: value.clone() for name, value in encoded.items()}
    for peer, public in sorted(peer_publics.items()):
        if peer == me:
            continue
        mask = mask_stream(pairwise_seed(my_private, public, context), encoded)
        sign = _sign(me, peer)
        for name in out:
            out[name] = torch.remainder(out[name] + sign * mask[name], MODULUS)
    return out


def remove_dropped_masks(
    masked_sum: Tensors,
    dropped: str,
    dropped_private: X25519PrivateKey,
    survivor_publics: Mapping[str, X25519PublicKey],
    context: bytes,
) -> Tensors:
    """Take out what each survivor added towards a client whose own input never arrived."""
    out = {name: value.clone() for name, value in masked_sum.items()}
    for survivor, public in sorted(survivor_publics.items()):
        mask = mask_stream(pairwise_seed(dropped_private, public, context), out)
        sign = _sign(survivor, dropped)  # the sign the survivor used towards the dropped client
        for name in out:
            out[name] = torch.remainder(out[name] - sign * mask[name], MODULUS)
    return out


def add_masked(total: Tensors, update: Tensors) -> None:
    """Add one masked update into the running sum, in place, in the ring: the aggregator holds
    the sum and one update at a time, and the masks cancel only in the sum of all of them."""
    for name, value in update.items():
        total[name].add_(value).remainder_(MODULUS)
