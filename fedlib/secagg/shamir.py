"""Shamir t-of-n secret sharing over the prime field GF(2^521 − 1).

Used to share a client's 32-byte per-round secrets: any `threshold` shares rebuild one, fewer
reveal nothing about it. Coefficients come from `secrets`, or from a keyed PRF when the dealer
must be able to recompute its own share later (the key is secret too, so the polynomial stays
unpredictable to everyone else); never from a seeded generator.
"""

from __future__ import annotations

import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PRIME = (1 << 521) - 1  # a Mersenne prime, comfortably above any 32-byte secret
_COEFFICIENT_BYTES = 80  # 640 bits reduced mod a 521-bit prime: bias below 2^-119

Share = tuple[int, int]  # (x, f(x)), x in 1..n


def _coefficients(threshold: int, key: bytes | None) -> list[int]:
    if key is None:
        return [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    stream = HKDF(hashes.SHA512(), _COEFFICIENT_BYTES * (threshold - 1), salt=None, info=b"fedlib/shamir/v1").derive(key)
    return [int.from_bytes(stream[i : i + _COEFFICIENT_BYTES], "big") % PRIME for i in range(0, len(stream), _COEFFICIENT_BYTES)]


def split_secret(secret: bytes, n: int, threshold: int, coefficient_key: bytes | None = None) -> list[Share]:
    """n shares, x = 1..n. With `coefficient_key` the same call gives the same shares."""
    if not 1 <= threshold <= n:
        raise ValueError(f"threshold {threshold} must be between 1 and n={n}")
    value = int.from_bytes(secret, "big")
    if value >= PRIME:
        raise ValueError("secret too large for the field")
    coefficients = [value] + _coefficients(threshold, coefficient_key)
    return [(x, _evaluate(coefficients, x)) for x in range(1, n + 1)]


def combine_shares(shares: list[Share], length: int = 32) -> bytes:
    """Lagrange interpolation at 0. Give at least `threshold` distinct shares; with fewer the
    result is a meaningless value, not an error (that is what makes fewer shares useless)."""
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs):
        raise ValueError("duplicate share indices")
    secret = 0
    for i, (x_i, y_i) in enumerate(shares):
        numerator, denominator = 1, 1
        for j, (x_j, _) in enumerate(shares):
            if i != j:
                numerator = numerator * (-x_j) % PRIME
                denominator = denominator * (x_i - x_j) % PRIME
        secret = (secret + y_i * numerator * pow(denominator, -1, PRIME)) % PRIME
    return secret.to_bytes(length, "big") if secret < 1 << (8 * length) else secret.to_bytes(66, "big")


def _evaluate(coefficients: list[int], x: int) -> int:
    result = 0
    for coefficient in reversed(coefficients):  # Horner
        result = (result * x + coefficient) % PRIME
    return result
