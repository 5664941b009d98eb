"""The aggregator's side of a plain round: every update through the one intake
(`fedlib.update.intake`), opened by `open_client_update`, combined by the strategy.

Every failure is an `UpdateRejected` with a named reason; the round goes on without that
client while `aggregation.min_clients` still hold.
"""

from __future__ import annotations

import time

from fedlib.codecs import CodecChain
from fedlib.config import AggregationConfig, PrivacyConfig
from fedlib.privacy.dp import DifferentialPrivacy, noise_generator
from fedlib.strategies import ClientUpdate, Strategy, make_strategy
from fedlib.strategies.normalized import StepNormalized
from fedlib.strategies.shares import capped_updates
from fedlib.update.chain import open_client_update
from fedlib.update.intake import AggregationReport, RoundIntake, check_quorum, read_updates
from fedlib.wire.envelope import EnvelopeContext, UpdateKey
from fedlib.wire.serialization import Tensors


def build_strategy(
    aggregation: AggregationConfig, privacy: PrivacyConfig, round_number: int, state: Tensors | None = None, secure_sum: bool = False
) -> Strategy:
    """The configured strategy with its state from the previous round; step-normalised when
    asked, and wrapped in DP-FedAvg when privacy is on. The noise is drawn from the OS's
    randomness unless `privacy.noise_seed` pins it (tests). Under secure aggregation
    (`secure_sum`) the clients have already normalised, clipped and noised what was summed."""
    strategy: Strategy = make_strategy(aggregation.strategy, aggregation.options)
    strategy.load_state_dict(state or {})
    if secure_sum:
        return strategy
    if aggregation.normalize_steps:
        strategy = StepNormalized(strategy)
    if not privacy.enabled:
        return strategy
    generator = noise_generator(privacy.noise_seed, round_number, "aggregator")
    return DifferentialPrivacy(strategy, privacy.clip_norm, privacy.noise_multiplier, generator)


def update_limit(max_update_bytes: int | None, global_adapter: Tensors) -> int:
    """The most bytes read of one client's update: `aggregation.max_update_bytes`, or twice the
    adapter's fp32 size plus 1 MiB (for the envelope, metadata and codec headers; the largest
    encoding is fp32 itself). A bucket that serves more is refused before the bytes are held."""
    if max_update_bytes is not None:
        return max_update_bytes
    return 2 * sum(4 * v.numel() for v in global_adapter.values()) + 2**20


def aggregate_updates(
    intake: RoundIntake,
    global_adapter: Tensors,
    template: Tensors,
    strategy: Strategy,
    codecs: CodecChain,
    max_weight_share: float,
    min_clients: int,
) -> tuple[Tensors, AggregationReport]:
    """Stream each expected client's update through `open_client_update` into `strategy`.
    `template` is the trained part of `global_adapter`: what an update holds, and all it may
    change. No client's claimed count gives it more than `max_weight_share` of the weight.

    Rejected updates are recorded and skipped; the round fails only if fewer than `min_clients`
    remain."""
    report = AggregationReport()

    def opener(blob: bytes, key: UpdateKey, ctx: EnvelopeContext) -> tuple[ClientUpdate, dict[str, str]]:
        return open_client_update(blob, key, ctx, template, intake.expected[ctx.client], codecs, intake.max_bytes)

    known = {c for c, e in intake.expected.items() if e.count_known}
    updates = capped_updates(read_updates(intake, report, opener), max_weight_share, known)
    started = time.perf_counter()
    try:
        new_adapter = {**global_adapter, **strategy.aggregate(intake.round, template, updates)}
    except ValueError:
        if report.accepted:
            raise
        new_adapter = None  # no update survived; reported as a quorum failure below
    report.aggregate_s = time.perf_counter() - started - report.download_decrypt_s
    check_quorum(intake, report, min_clients, f"aggregation.min_clients={min_clients}")
    assert new_adapter is not None
    return new_adapter, report
