"""A query of Grafana's PostgreSQL data source for grafana-foundation-sdk, which ships builders for the core
data sources but none for SQL: a custom query type, as the SDK's documentation shows ("Defining a custom query
type"). Only raw SQL in code mode — what the dashboard uses."""

from __future__ import annotations

from typing import Literal, Self

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import dashboard

POSTGRES_TYPE = "grafana-postgresql-datasource"  # the plugin id since Grafana 10.2 ("postgres" is an alias)

SqlFormat = Literal["table", "time_series"]


class SqlDataquery(cogvariants.Dataquery):
    def __init__(
        self,
        raw_sql: str = "",
        format_val: SqlFormat = "table",
        ref_id: str = "",
        datasource: dashboard.DataSourceRef | None = None,
    ) -> None:
        self.raw_sql = raw_sql
        self.format_val = format_val
        self.ref_id = ref_id
        self.datasource = datasource

    def to_json(self) -> dict[str, object]:
        payload: dict[str, object] = {
            "editorMode": "code",
            "format": self.format_val,
            "rawQuery": True,
            "rawSql": self.raw_sql,
            "refId": self.ref_id,
        }
        if self.datasource is not None:
            payload["datasource"] = self.datasource
        return payload


class SqlQuery(cogbuilder.Builder[SqlDataquery]):
    def __init__(self, raw_sql: str) -> None:
        self._internal = SqlDataquery(raw_sql=raw_sql)

    def build(self) -> SqlDataquery:
        return self._internal

    def format(self, format_val: SqlFormat) -> Self:
        self._internal.format_val = format_val
        return self

    def ref_id(self, ref_id: str) -> Self:
        self._internal.ref_id = ref_id
        return self

    def datasource(self, datasource: dashboard.DataSourceRef) -> Self:
        self._internal.datasource = datasource
        return self
