"""Usage and cost reports from the usage records, in the shape of OpenAI's Usage and Costs APIs
(/v1/organization/usage/completions, /usage/embeddings, /costs): time buckets, each with one result per group.
A mesh tenant is OpenAI's project (project_id), a key its api_key_id. The mesh adds what OpenAI's shape has no
field for: cache hits and the tokens they saved, and failed and cancelled requests."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from sqlalchemy import Engine, case, func, select

from services.admin import schema
from services.common.errors import invalid

# OpenAI's widths, with its default and largest bucket counts per page.
WIDTHS_MIN = {"1m": 1, "1h": 60, "1d": 1440}
LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
GROUPS = {"project_id": schema.usage.c.tenant, "api_key_id": schema.usage.c.key_id, "model": schema.usage.c.model}
# The mesh API's requests and the KServe API's (stock Triton clients) alike.
KINDS = {"completions": ("generate", "ask", "kserve"), "embeddings": ("embed", "kserve-embed"),
         "costs": ("generate", "ask", "embed", "kserve", "kserve-embed")}
CACHE_HITS = ("CACHE_STATUS_EXACT_HIT", "CACHE_STATUS_SEMANTIC_HIT")  # as the records name them
MAX_FILTER_VALUES = 100


@dataclass(frozen=True)
class UsageQuery:
    report: str                     # completions | embeddings | costs
    start_time: int                 # unix seconds, inclusive
    end_time: int | None = None     # exclusive; None: now
    bucket_width: str = "1d"
    group_by: tuple[str, ...] = ()
    project_ids: tuple[str, ...] = ()
    api_key_ids: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    limit: int | None = None
    page: str = ""                  # next_page of the previous answer

    def checked(self) -> UsageQuery:
        if self.report not in KINDS:
            raise invalid(f"unknown report {self.report!r}: completions, embeddings or costs")
        if self.bucket_width not in WIDTHS_MIN or (self.report == "costs" and self.bucket_width != "1d"):
            allowed = "1d" if self.report == "costs" else "1m, 1h or 1d"
            raise invalid(f"bucket_width must be {allowed}, got {self.bucket_width[:20]!r}")
        allowed_groups = ("project_id", "line_item") if self.report == "costs" else tuple(GROUPS)
        for group in self.group_by:
            if group not in allowed_groups:
                raise invalid(f"group_by {group[:40]!r}: one of {', '.join(allowed_groups)}")
        for name in ("project_ids", "api_key_ids", "models"):
            if len(getattr(self, name)) > MAX_FILTER_VALUES:
                raise invalid(f"{name}: at most {MAX_FILTER_VALUES} values")
        if self.start_time < 0 or (self.end_time is not None and self.end_time <= self.start_time):
            raise invalid("start_time must be unix seconds before end_time")
        _, largest = LIMITS[self.bucket_width]
        if self.limit is not None and not 1 <= self.limit <= largest:
            raise invalid(f"limit must be within 1..{largest} for bucket_width {self.bucket_width}")
        if self.page and not self.page.isdigit():
            raise invalid("page: the next_page value of the previous answer")
        return self


def report(engine: Engine, query: UsageQuery) -> dict:
    query = query.checked()
    width = WIDTHS_MIN[query.bucket_width]
    start = int(query.page) if query.page else query.start_time
    end = query.end_time if query.end_time is not None else int(time.time()) + 1
    default, _ = LIMITS[query.bucket_width]
    wanted = math.ceil(max(0, end - start) / (width * 60))
    buckets = min(wanted, query.limit or default)
    page_end = min(end, start + buckets * width * 60)
    start_minute, end_minute = start // 60, math.ceil(page_end / 60)

    usage = schema.usage.c
    groups = [] if query.report == "costs" else list(query.group_by)
    if query.report == "costs" and "project_id" in query.group_by:
        groups = ["project_id"]
    bucket = ((usage.minute - start_minute) // width).label("bucket")
    columns = [bucket, *(GROUPS[g].label(g) for g in groups),
               func.count().label("requests"),
               func.sum(usage.input_tokens).label("input_tokens"),
               func.sum(usage.output_tokens).label("output_tokens"),
               func.sum(usage.cached_tokens).label("saved_tokens"),
               func.sum(case((usage.cache.in_(CACHE_HITS), 1), else_=0)).label("cache_hits"),
               func.sum(case((usage.status == "OK", 0), else_=1)).label("not_ok"),
               func.sum(usage.cost_usd).label("cost")]
    statement = (select(*columns)
                 .where(usage.minute >= start_minute, usage.minute < end_minute, usage.kind.in_(KINDS[query.report]))
                 .group_by(bucket, *(GROUPS[g] for g in groups)).order_by(bucket))
    for values, column in ((query.project_ids, usage.tenant), (query.api_key_ids, usage.key_id),
                           (query.models, usage.model)):
        if values:
            statement = statement.where(column.in_(values))
    with engine.connect() as connection:
        rows = list(connection.execute(statement))

    results: dict[int, list[dict]] = {index: [] for index in range(buckets)}
    for row in rows:
        if row.bucket in results:
            results[row.bucket].append(_result(query.report, row, groups, "line_item" in query.group_by))
    data = [{"object": "bucket", "start_time": start + index * width * 60,
             "end_time": min(end, start + (index + 1) * width * 60), "results": results[index]}
            for index in range(buckets)]
    more = wanted > buckets
    return {"object": "page", "data": data, "has_more": more, "next_page": str(page_end) if more else None}


def _result(kind: str, row, groups: list[str], by_line_item: bool) -> dict:
    grouped = {name: getattr(row, name) for name in groups}
    if kind == "costs":
        return {"object": "organization.costs.result", "amount": {"value": float(row.cost or 0.0), "currency": "usd"},
                "line_item": None if not by_line_item else "inference", "project_id": grouped.get("project_id")}
    result = {"object": f"organization.usage.{kind}.result", "input_tokens": int(row.input_tokens or 0),
              "num_model_requests": int(row.requests), "project_id": grouped.get("project_id"), "user_id": None,
              "api_key_id": grouped.get("api_key_id"), "model": grouped.get("model"),
              "mesh_cache_hits": int(row.cache_hits or 0), "mesh_tokens_saved": int(row.saved_tokens or 0),
              "mesh_failed_or_cancelled": int(row.not_ok or 0)}
    if kind == "completions":
        result.update(output_tokens=int(row.output_tokens or 0), input_cached_tokens=0, input_audio_tokens=0,
                      output_audio_tokens=0, batch=None)
    return result
