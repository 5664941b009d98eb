"""A party's own privacy policy, pinned on its own machine, against whoever starts its runs.

A client's runs are started by the federation's orchestrator (the aggregator's Prefect), which
hands the client its config and its step's request. Without a policy of its own, a client runs
whatever it is handed: a config with secure aggregation, DP or the TEE requirement switched off,
or a `train` step without its secure-aggregation request, and its update leaves unmasked. So
`fedlib keys trust` pins, beside the keyring digest (`fedlib.wire.trust`), the policy of the
config the party reviewed, and every step of that party refuses a run whose config or request
is weaker (`weaknesses`). Raising the pin is the same command with a stronger config; lowering it
takes `--lower-policy`, on the party's own machine.

"Weaker", field by field: secure aggregation off, or a lower threshold; DP off, a smaller noise
multiplier, a larger clip norm, δ or ε budget (or none), or a fixed noise seed; the TEE
requirement off, another verifier, a pinned PCR or measurement missing or changed, older
firmware accepted, debug allowed, older evidence accepted; a codec the pin does not list.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from fedlib.config import AttestationConfig, CompressionConfig, PrivacyConfig, SecureAggregationConfig, SplitConfig


class PolicyRefused(PermissionError):
    """A run whose config or request is weaker than the party's pinned policy."""


@dataclass(frozen=True)
class TeePolicy:
    """What the split server's evidence must show, as `split.attestation` says it."""

    verifier: str
    pcrs: dict[int, str] = field(default_factory=dict)
    measurement: str | None = None
    min_tcb: dict[str, int] = field(default_factory=dict)
    allow_debug: bool = False
    max_age_s: float = 300.0
    max_vmpl: int = 0
    min_abi: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class PartyPolicy:
    """The floors a party holds every run to. DP's fields are the accountant's inputs: noise
    multiplier (a floor), clip norm, δ and ε budget (ceilings)."""

    secure_aggregation: bool = False
    threshold: int = 0  # reveals needed to unmask; a floor
    dp: bool = False
    noise_multiplier: float = 0.0
    clip_norm: float = 0.0
    delta: float = 0.0
    epsilon_budget: float | None = None
    fixed_noise: bool = False  # a noise seed (tests only) is accepted
    require_tee: bool = False
    tee: TeePolicy | None = None
    codecs: tuple[str, ...] = ()  # update codecs the party accepts

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: Any) -> PartyPolicy:
        """The decode boundary of a pinned policy (a file on the party's own machine)."""
        try:
            return _ADAPTER.validate_python(value)
        except ValidationError as err:
            first = err.errors()[0]
            raise ValueError(f"not a policy: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None

    def describe(self) -> str:
        parts = [f"secure aggregation {'on, threshold ≥ ' + str(self.threshold) if self.secure_aggregation else 'off'}"]
        if self.dp:
            budget = "none" if self.epsilon_budget is None else f"≤ {self.epsilon_budget:g}"
            parts.append(
                f"DP on (noise_multiplier ≥ {self.noise_multiplier:g}, clip_norm ≤ {self.clip_norm:g}, δ ≤ {self.delta:g}, ε budget {budget})"
            )
        else:
            parts.append("DP off")
        parts.append(f"TEE required ({self.tee.verifier})" if self.require_tee and self.tee else "TEE not required")
        parts.append(f"codecs {list(self.codecs) or 'none'}")
        return "; ".join(parts)


_ADAPTER = TypeAdapter(PartyPolicy)


def offered_policy(
    privacy: PrivacyConfig, secure: SecureAggregationConfig, threshold: int, split: SplitConfig, compression: CompressionConfig
) -> PartyPolicy:
    """The policy a config asks a party to run under; `threshold` is the resolved one."""
    return PartyPolicy(
        secure_aggregation=secure.enabled,
        threshold=threshold if secure.enabled else 0,
        dp=privacy.enabled,
        noise_multiplier=privacy.noise_multiplier if privacy.enabled else 0.0,
        clip_norm=privacy.clip_norm if privacy.enabled else 0.0,
        delta=privacy.delta if privacy.enabled else 0.0,
        epsilon_budget=privacy.epsilon_budget if privacy.enabled else None,
        fixed_noise=privacy.enabled and privacy.noise_seed is not None,
        require_tee=split.require_tee,
        tee=_tee(split.attestation) if split.require_tee else None,
        codecs=tuple(compression.codecs),
    )


def _tee(attestation: AttestationConfig) -> TeePolicy:
    assert attestation.verifier is not None  # SplitConfig requires it with require_tee
    return TeePolicy(
        attestation.verifier,
        dict(attestation.pcrs),
        attestation.measurement,
        attestation.min_tcb.model_dump(),
        attestation.allow_debug,
        attestation.max_age_s,
        attestation.max_vmpl,
        attestation.min_abi,
    )


def weaknesses(pinned: PartyPolicy, offered: PartyPolicy) -> list[str]:
    """Each way `offered` is weaker than `pinned`, as `config field: what`; empty if none."""
    out = []
    if pinned.secure_aggregation:
        if not offered.secure_aggregation:
            out.append("secure_aggregation.enabled: false, pinned true")
        elif offered.threshold < pinned.threshold:
            out.append(f"secure_aggregation.threshold: {offered.threshold}, pinned at least {pinned.threshold}")
    if pinned.dp:
        out += _dp_weaknesses(pinned, offered)
    if pinned.require_tee and pinned.tee is not None:
        if not offered.require_tee or offered.tee is None:
            out.append("split.require_tee: false, pinned true")
        else:
            out += _tee_weaknesses(pinned.tee, offered.tee)
    extra = sorted(set(offered.codecs) - set(pinned.codecs))
    if extra:
        out.append(f"compression.codecs: {extra} not among the pinned {list(pinned.codecs)}")
    return out


def _dp_weaknesses(pinned: PartyPolicy, offered: PartyPolicy) -> list[str]:
    if not offered.dp:
        return ["privacy.enabled: false, pinned true"]
    out = []
    if offered.noise_multiplier < pinned.noise_multiplier:
        out.append(f"privacy.noise_multiplier: {offered.noise_multiplier:g}, pinned at least {pinned.noise_multiplier:g}")
    if offered.clip_norm > pinned.clip_norm:
        out.append(f"privacy.clip_norm: {offered.clip_norm:g}, pinned at most {pinned.clip_norm:g}")
    if offered.delta > pinned.delta:
        out.append(f"privacy.delta: {offered.delta:g}, pinned at most {pinned.delta:g}")
    if pinned.epsilon_budget is not None and (offered.epsilon_budget is None or offered.epsilon_budget > pinned.epsilon_budget):
        out.append(f"privacy.epsilon_budget: {offered.epsilon_budget}, pinned at most {pinned.epsilon_budget:g}")
    if offered.fixed_noise and not pinned.fixed_noise:
        out.append("privacy.noise_seed: set (removable noise), pinned unset")
    return out


def _tee_weaknesses(pinned: TeePolicy, offered: TeePolicy) -> list[str]:
    out = []
    if offered.verifier != pinned.verifier:
        out.append(f"split.attestation.verifier: {offered.verifier}, pinned {pinned.verifier}")
    changed = sorted(i for i, digest in pinned.pcrs.items() if offered.pcrs.get(i) != digest)
    if changed:
        out.append(f"split.attestation.pcrs: PCR{changed} missing or not the pinned digest")
    if pinned.measurement is not None and offered.measurement != pinned.measurement:
        out.append("split.attestation.measurement: not the pinned launch measurement")
    older = sorted(k for k, v in pinned.min_tcb.items() if offered.min_tcb.get(k, 0) < v)
    if older:
        out.append(f"split.attestation.min_tcb: {older} older than pinned")
    if offered.allow_debug and not pinned.allow_debug:
        out.append("split.attestation.allow_debug: true, pinned false")
    if offered.max_vmpl > pinned.max_vmpl:
        out.append(f"split.attestation.max_vmpl: {offered.max_vmpl}, pinned at most {pinned.max_vmpl}")
    if offered.min_abi < pinned.min_abi:
        out.append(f"split.attestation.min_abi: {list(offered.min_abi)}, pinned at least {list(pinned.min_abi)}")
    if offered.max_age_s > pinned.max_age_s:
        out.append(f"split.attestation.max_age_s: {offered.max_age_s:g}, pinned at most {pinned.max_age_s:g}")
    return out


def require_policy(pinned: PartyPolicy, offered: PartyPolicy, party: str, where: str) -> None:
    """Refuse, in one line naming every weakened field, a run weaker than `party`'s pin."""
    weak = weaknesses(pinned, offered)
    if weak:
        raise PolicyRefused(
            f"{'; '.join(weak)}: weaker than the policy {party} pinned in {where}; run it with the pinned settings, or lower "
            f"the pin on {party}'s own machine (`fedlib keys trust CONFIG --party {party} --lower-policy`)"
        )


def require_secure_request(pinned: PartyPolicy, step: str, has_request: bool, party: str) -> None:
    """A `train` step without its secure-aggregation request would upload the update unmasked."""
    if pinned.secure_aggregation and step == "train" and not has_request:
        raise PolicyRefused(
            f"secure: the {step} request carries no secure-aggregation session, and {party} pinned secure aggregation; "
            "start this step from the federation's secure round"
        )
