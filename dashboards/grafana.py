"""A small builder for Grafana dashboard JSON: rows of panels laid out on Grafana's 24-column
grid, Prometheus queries, and template variables. Only what Sluis' dashboards use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GRID_WIDTH = 24
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat | bargauge | table
    description: str = ""
    width: int = 12
    height: int = 8
    # Whether the panel shows data only once something went wrong (errors, fail-opens).
    failure_case: bool = False
    thresholds: tuple[tuple[str, float | None], ...] = ()
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True)
class Variable:
    name: str
    label: str
    query: str  # label_values(metric, label)

    def json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "type": "query",
            "datasource": DATASOURCE,
            "definition": self.query,
            "query": {"query": self.query, "refId": f"var-{self.name}"},
            "includeAll": True,
            "allValue": ".*",
            "multi": True,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "refresh": 2,  # on time range change
            "sort": 1,
        }


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    variables: tuple[Variable, ...] = ()
    rows: list[tuple[str, list[Panel]]] = field(default_factory=list)

    def row(self, title: str, *panels: Panel) -> None:
        self.rows.append((title, list(panels)))

    def panels(self) -> list[Panel]:
        return [panel for _, panels in self.rows for panel in panels]

    def json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["sluis"],
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"},
            "timezone": "browser",
            "annotations": {"list": []},
            "links": [
                {"type": "dashboards", "tags": ["sluis"], "asDropdown": True, "title": "Sluis"}
            ],
            "templating": {"list": [_datasource_variable(), *(v.json() for v in self.variables)]},
            "panels": self._layout(),
        }

    def _layout(self) -> list[dict[str, Any]]:
        laid: list[dict[str, Any]] = []
        y = 0
        next_id = 1
        for title, panels in self.rows:
            laid.append(
                {
                    "type": "row",
                    "id": next_id,
                    "title": title,
                    "collapsed": False,
                    "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                    "panels": [],
                }
            )
            next_id += 1
            y += 1
            x = 0
            line_height = 0
            for panel in panels:
                if x + panel.width > GRID_WIDTH:
                    x, y, line_height = 0, y + line_height, 0
                laid.append(_panel_json(panel, next_id, x, y))
                next_id += 1
                x += panel.width
                line_height = max(line_height, panel.height)
            y += line_height
        return laid


def _datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
    }


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.minimum is not None:
        defaults["min"] = panel.minimum
    if panel.maximum is not None:
        defaults["max"] = panel.maximum
    if panel.thresholds:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": color, "value": value} for color, value in panel.thresholds],
        }
    body: dict[str, Any] = {
        "type": panel.kind,
        "id": panel_id,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": _options(panel.kind),
        "targets": [
            {
                "datasource": DATASOURCE,
                "expr": query.expr,
                "legendFormat": query.legend or "__auto",
                "refId": chr(ord("A") + index),
                "instant": panel.kind in ("stat", "bargauge", "table"),
                "range": panel.kind == "timeseries",
                **({"format": "table"} if panel.kind == "table" else {}),
            }
            for index, query in enumerate(panel.queries)
        ],
    }
    if panel.failure_case:
        body["sluis"] = {"failure_case": True}
    return body


def _options(kind: str) -> dict[str, Any]:
    if kind == "timeseries":
        return {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    if kind in ("stat", "bargauge"):
        return {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    return {"showHeader": True}
