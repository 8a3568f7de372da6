"""contrib/grafana/fdsupervisor.json and contrib/prometheus/alerts.yml against a real /metrics.

Every PromQL expression (panel queries, template variables, alert rules) may
name only series that a real supervisor's endpoint exports; a renamed family
breaks this test, not an operator's dashboard. Metric names are taken from
the expressions by a small PromQL scanner: strings, label matchers, ranges,
grouping clauses and function calls are removed, and what is left that looks
like a name is a series name.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PYTHON, REPORT_WORKER, ROOT, SupervisorProcess

DASHBOARD = ROOT / "contrib" / "grafana" / "fdsupervisor.json"
ALERTS = ROOT / "contrib" / "prometheus" / "alerts.yml"

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
KEYWORDS |= {"and", "or", "unless", "inf", "nan"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
NAME = re.compile(r"(?<![\w$:.])[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()")


def series_names(expr: str) -> set[str]:
    """The series an expression selects (Grafana's $variables are not names)."""
    text = STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges, subqueries
    text = GROUPING.sub("", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)
    return {name for name in NAME.findall(text) if name.lower() not in KEYWORDS}


def test_the_scanner_finds_names_and_only_names() -> None:
    expr = (
        'sum by (unit, reason) (rate(a_total{unit=~"$unit", x="b_total"}[$__rate_interval]))'
        " / on (unit) group_left max without (state) (c) > bool 5 and d offset 5m"
    )
    assert series_names(expr) == {"a_total", "c", "d"}


UNITS = {
    "web": f"""
    sockets:
      http: {{listen: "127.0.0.1:0"}}
    service:
      exec: [{PYTHON}, {REPORT_WORKER}]
    """,
    "conn": f"""
    sockets:
      conn: {{listen: "127.0.0.1:0", trigger-limit: {{interval: 1s, burst: 100}}}}
    service:
      accept: true
      exec: [{PYTHON}, {REPORT_WORKER}]
    """,
}


@pytest.fixture
def exported(supervisor: Callable[..., SupervisorProcess], tmp_path: Any) -> Iterator[set[str]]:
    """The series names a real supervisor exports (a counter family's are NAME_total)."""
    (tmp_path / "units").mkdir(exist_ok=True)
    sup = supervisor(UNITS, args=["--metrics", "127.0.0.1:0", str(tmp_path / "units")])
    address = sup.wait_for("metrics_listening")["address"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
        names.update(sample.name for sample in family.samples)
    assert "fdsupervisor_connections_accepted_total" in names
    yield names


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"]
        selector = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
        assert selector, f"variable {variable['name']}: {query}"
        exprs.append(selector.group(1))
    return exprs


def test_the_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    inputs = dashboard["__inputs"]
    assert [(i["name"], i["type"], i["pluginId"]) for i in inputs] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")
    ]
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    source = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for panel in dashboard["panels"]:
        assert panel["datasource"] == source and panel["targets"], panel["title"]
        assert panel["description"], panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert all(target["datasource"] == source for target in panel["targets"])
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == source
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert titles == {
        "Workers per unit",
        "Service state",
        "Restart rate",
        "Worker starts and exits by reason",
        "Activations and accepted connections",
        "Paused sockets",
        "Stored fds",
        "Monitor clients",
    }


def test_every_dashboard_expression_names_exported_series(exported: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for expr in dashboard_expressions(dashboard):
        names = series_names(expr)
        assert names, f"no series in {expr!r}"
        assert names <= exported, f"{expr!r} names {names - exported}"
        used |= names
    # and every family has a panel
    families = {name for name in exported if not name.endswith(("_created", "_sum", "_count"))}
    assert families <= used, f"no panel for {families - used}"


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_alert_rules_parse_and_name_exported_series(exported: set[str]) -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == {
        "FdsupervisorServiceFailed",
        "FdsupervisorRestartRate",
        "FdsupervisorSocketPaused",
    }
    for rule in rules:
        names = series_names(rule["expr"])
        assert names and names <= exported, f"{rule['alert']}: {names - exported}"
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_docs_show_the_rules_file_and_every_panel() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    assert "contrib/prometheus/alerts.yml" in text and "scrape_configs:" in text
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        assert f"**{panel['title']}**" in text, panel["title"]
