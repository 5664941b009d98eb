"""The aggregator's side of a secure round: sum the masked updates it cannot read, then, with
the survivors' reveals, take the masks out of the sum and apply it as one averaged update."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedlib.config import FederationConfig
from fedlib.model.base import trained_part
from fedlib.round.aggregator import AggregationReport, check_quorum, read_updates, update_limit
from fedlib.secagg.fixedpoint import MODULUS, Tensors, decode, from_wire
from fedlib.secagg.protocol import Session, unmask_sum
from fedlib.secagg.quantised import Codes
from fedlib.secagg.weights import WeightRule
from fedlib.strategies import ClientUpdate, Strategy
from fedlib.update.chain import Expected
from fedlib.update.validation import check_update
from fedlib.wire.decode import bounded_int, load_tensors
from fedlib.wire.envelope import EnvelopeContext, UpdateKey, open_sealed
from fedlib.wire.storage import Options


@dataclass(frozen=True)
class MaskedSum:
    residues: Tensors  # Σ masked weight/scale·update mod 2^32, as int64
    weight: int  # Σ the survivors' weights (examples, or 1 each under DP)
    weighted_steps: int  # Σ weight × local steps, for step normalisation
    weight_scale: float  # the scale every client divided its weight by
    codes: Codes | None = None  # how the clients coded their updates, with `secure_aggregation.bits`

    def mean_factor(self, rule: WeightRule) -> float:
        return rule.mean_factor(self.weight_scale, self.weight, self.weighted_steps)


def wire_template(global_adapter: Tensors) -> Tensors:
    """What a masked update must look like: the adapter's names and shapes, as int32."""
    return {name: torch.empty(value.shape, dtype=torch.int32) for name, value in global_adapter.items()}


def open_masked_update(
    blob: bytes, key: UpdateKey, ctx: EnvelopeContext, template: Tensors, expected: Expected, rule: WeightRule, codes: Codes | None = None
) -> tuple[tuple[Tensors, int, int], dict[str, str]]:
    """(residues, weight, local steps) of one masked update, and its authenticated metadata: the
    mask filter's receiving side (`fedlib.update.chain`). `ctx` names the session: an upload left
    from another attempt of the round was masked against other masks, and would turn the
    unmasked sum into noise. The weight is held to `rule`, since it scales the mean."""
    payload = open_sealed(blob, key, ctx)
    wire = wire_template(template) if codes is None else codes.wire_template(template)

    def allowed(name: str, spec) -> str | None:
        ref = wire.get(name)
        return None if ref is not None and spec.shape == tuple(ref.shape) and spec.dtype == ref.dtype else "not in the adapter's layout"

    tensors, meta = load_tensors(payload, "masked update", allowed)
    check_update(tensors, wire)
    num_examples, local_steps = expected.counts(meta)
    weight = bounded_int(meta, "weight", 1, expected.max_examples, "masked update")
    rule.check(weight, num_examples)
    residues = from_wire(tensors) if codes is None else codes.unpack(tensors, template)
    return (residues, weight, local_steps), meta


def sum_masked_updates(
    config: FederationConfig,
    round_number: int,
    global_adapter: Tensors,
    clients: Sequence[str],
    failed: Mapping[str, str],
    keys: Mapping[str, UpdateKey],
    weight_scale: float,
    session: str,
    parent: str,
    expected: Mapping[str, Expected],
    storage_options: Mapping[str, Options] | None = None,
    late: Sequence[str] = (),
    codes: Codes | None = None,
) -> tuple[MaskedSum, AggregationReport]:
    """Streamed like plain aggregation: one update in memory at a time. Needs at least
    `secagg_min_survivors` updates, or the masks could not be removed. Every update must be of
    this `session` and trained from `parent`."""
    report = AggregationReport()
    template = trained_part(config.lora, global_adapter)
    rule = WeightRule(dp=config.privacy.enabled, normalize_steps=config.aggregation.normalize_steps)

    def opener(blob: bytes, key: UpdateKey, ctx: EnvelopeContext) -> tuple[tuple[Tensors, int, int], dict[str, str]]:
        return open_masked_update(blob, key, ctx, template, expected[ctx.client], rule, codes)

    total: Tensors = {name: torch.zeros(value.shape, dtype=torch.int64) for name, value in template.items()}
    weight = weighted_steps = 0
    limit = update_limit(config, global_adapter)
    updates = read_updates(
        config, round_number, clients, failed, keys, storage_options, report, opener, expected, late, parent, session, limit
    )
    for residues, client_weight, steps in updates:
        started = time.perf_counter()
        for name, value in residues.items():
            total[name].add_(value).remainder_(MODULUS)
        weight += client_weight
        weighted_steps += client_weight * steps
        report.aggregate_s += time.perf_counter() - started
    needed = config.secagg_min_survivors
    why = f"secure aggregation needs {needed} (aggregation.min_clients, secure_aggregation.threshold)"
    check_quorum(round_number, clients, report, needed, why)
    return MaskedSum(total, weight, weighted_steps, weight_scale, codes), report


def finish_secure_round(
    config: FederationConfig,
    global_adapter: Tensors,
    masked: MaskedSum,
    session: Session,
    mask_publics: Mapping[str, str],
    survivors: Sequence[str],
    dropped: Sequence[str],
    reveals: Mapping[str, str],
    keys: Mapping[str, UpdateKey],
    strategy: Strategy,
) -> Tensors:
    """The next global adapter from the unmasked sum, by a strategy built with `secure_sum`:
    the clients already normalised, clipped and noised what they masked."""
    total = unmask_sum(masked.residues, session, mask_publics, survivors, dropped, reveals, keys)
    factor = masked.mean_factor(WeightRule(dp=config.privacy.enabled, normalize_steps=config.aggregation.normalize_steps))
    summed = decode(total, config.secure_aggregation.frac_bits) if masked.codes is None else masked.codes.decode_sum(total)
    mean = {name: (value * factor).to(global_adapter[name].dtype) for name, value in summed.items()}
    trained = trained_part(config.lora, global_adapter)
    return {**global_adapter, **strategy.aggregate(session.round, trained, [ClientUpdate("secure-sum", masked.weight, mean)])}
