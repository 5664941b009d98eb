"""The figure people look at first: perplexity and bytes moved, round by round."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure


def progress_figure(rounds: Sequence[int], perplexity: Sequence[float], bytes_by_client: Mapping[str, Sequence[int]]) -> Figure:
    """Left: held-out perplexity (round 0 is the base model). Right: uploaded bytes per client
    for rounds 1..n."""
    fig = Figure(figsize=(10, 4), layout="constrained")  # not pyplot: nothing global to leak or close
    left, right = fig.subplots(1, 2)
    left.plot(rounds, perplexity, marker="o")
    left.set(xlabel="round", ylabel="held-out perplexity", title="Global adapter perplexity")
    left.set_xticks(list(rounds))
    trained = [r for r in rounds if r > 0]
    width = 0.8 / max(1, len(bytes_by_client))
    for i, (client, sizes) in enumerate(sorted(bytes_by_client.items())):
        right.bar([r + (i - (len(bytes_by_client) - 1) / 2) * width for r in trained], [s / 1e6 for s in sizes], width, label=client)
    right.set(xlabel="round", ylabel="MB uploaded", title="Encrypted update size per client")
    right.set_xticks(trained)
    if bytes_by_client:
        tallest = max((max(v, default=0) for v in bytes_by_client.values()), default=0) / 1e6
        right.set_ylim(0, max(tallest, 1e-9) * 1.3)  # headroom so the legend never covers a bar
        right.legend(loc="upper center", ncol=len(bytes_by_client))
    return fig


def loss_figure(losses: Sequence[float]) -> Figure:
    """Training loss by step (split fine-tuning)."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    axes = fig.subplots()
    axes.plot(range(1, len(losses) + 1), losses)
    axes.set(xlabel="step", ylabel="training loss", title="Split fine-tuning loss")
    return fig
