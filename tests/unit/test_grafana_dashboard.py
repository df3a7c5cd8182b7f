"""docs/grafana-lalo.json is built on names lalo's /metrics really has: lalo's own families
(rendered by the real ProxyMetrics) and llama-server's (a capture from the real server)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from launcher.proxy.activity import Activity
from launcher.proxy.metrics import ProxyMetrics
from launcher.proxy.metrics_merge import MergedMetrics, merge, relabel
from launcher.proxy.upstream import UpstreamPool
from launcher.supervisor.supervisor import Supervisor

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana-lalo.json"
CAPTURE = Path(__file__).parent / "data" / "llama_server_metrics.txt"
_NAME = re.compile(r"\b((?:lalo_|llamacpp:)[A-Za-z0-9_:]+)")


def exported_names() -> set[str]:
    metrics = ProxyMetrics(Supervisor([]), Activity(), MergedMetrics(lambda: {}, UpstreamPool()))
    text = metrics.render().decode() + merge([relabel(CAPTURE.read_text(), "smol")])
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def test_every_metric_in_the_dashboard_exists() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    expressions += [variable["query"] for variable in dashboard["templating"]["list"]
                    if variable["type"] == "query"]
    used = {name for expr in expressions for name in _NAME.findall(expr)}
    assert len(used) >= 15
    missing = used - exported_names()
    assert not missing, f"the dashboard uses metrics lalo does not export: {sorted(missing)}"
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
