"""What `lalo up` tells its user once the proxy serves: the address, the config and budget,
the CPU policy, GPU offload, demo models, peers, and why each model not started waits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from launcher import __version__
from launcher.config import LoadedConfig
from launcher.placement.cpu_share import CpuShare, policy_line
from launcher.placement.gpu_offload import Offload
from launcher.placement.planner import Plan
from launcher.placement.resolve import ResolvedModel
from launcher.units import format_size

if TYPE_CHECKING:  # the proxy is imported once the model servers are starting
    from launcher.proxy.peers import PeerTable

Announce = Callable[[str], None]


def serving_lines(url: str, loaded: LoadedConfig, plan: Plan, share: CpuShare,
                  offload: Offload, models: Sequence[ResolvedModel],
                  governed: Sequence[str] = ()) -> list[str]:
    """The lines right after the proxy started: where, from what config, on what machine;
    `governed`: the models whose threads follow what is busy."""
    lines = [
        f"lalo {__version__} serving {url}  (dashboard {url}/, OpenAI API {url}/v1)",
        f"config: {loaded.describe_source()}; RAM budget {format_size(plan.budget.bytes)} "
        f"({plan.budget.source})",
    ]
    if governed:
        lines.append(f"cpu: threads from what is busy for {', '.join(governed)} ({share.cpus} "
                     "CPUs: one busy alone gets all, busy ones share them; lalo's engine)")
    if share.oversubscribed and len(governed) < len(models):
        lines.append(f"cpu: {policy_line(share)}")
    lines.extend(offload.lines())
    for model in models:
        if model.info is not None and model.info.is_synthetic:
            lines.append(f"  {model.name}: random-weight demo model (it answers with noise, "
                         "not text)")
    return lines


def peers_line(peers: PeerTable) -> str:
    return f"peers: {', '.join(f'{n} ({p.config.url})' for n, p in peers.peers.items())}"


def plan_lines(plan: Plan) -> list[str]:
    """Each model the plan does not start now, and why; each context the plan changed."""
    lines = []
    for decision in plan.decisions:
        if decision.action != "start":
            lines.append(f"  {decision.name}: {decision.action}: {decision.reason}")
        if decision.ctx_note:
            lines.append(f"  {decision.name}: {decision.ctx_note}")
    return lines
