"""A batch input file is refused at upload with the line and what is wrong with it; a good one is kept as parsed."""

from __future__ import annotations

import json

import pytest

from services.gateway.batches.jsonl import BadFile, parse


def _line(custom_id: str = "a", url: str = "/v1/chat/completions", **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                       "body": {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], **body}})


def test_a_good_file_is_kept_line_by_line():
    data = (_line("a") + "\n\n" + _line("b", max_tokens=3) + "\n").encode()
    lines = parse(data, max_line_bytes=10_000, max_lines=10)
    assert [(line.number, line.custom_id, line.model) for line in lines] == [(1, "a", "smollm2"), (3, "b", "smollm2")]
    assert json.loads(lines[1].body)["max_tokens"] == 3


@pytest.mark.parametrize("data, words", [
    (b"", "the file is empty"),
    (b"\n \n", "the file is empty"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"custom_id,url\na,b\n", "line 1 is not JSON"),
    (b"[1, 2]\n", "line 1 is not a JSON object"),
    ((_line("a") + "\n" + _line("a")).encode(), "line 2: custom_id 'a' is used twice"),
    (_line(url="/v1/images").encode(), "url '/v1/images' is not one a batch can call"),
    (json.dumps({"custom_id": "a", "method": "GET", "url": "/v1/embeddings", "body": {"model": "m"}}).encode(),
     'method must be "POST"'),
    (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}).encode(),
     "body.model must name a model"),
    (json.dumps({"custom_id": "", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m"}}).encode(),
     "custom_id must be a string"),
    (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m"},
                 "priority": "high"}).encode(), "fields a batch request does not: priority"),
    (_line(content="x" * 2000).encode(), "over this deployment's 1000 per line"),
])
def test_a_bad_file_is_refused_with_its_line(data, words):
    with pytest.raises(BadFile, match=words.replace("(", r"\(")):
        parse(data, max_line_bytes=1000, max_lines=10)


def test_more_lines_than_a_batch_takes_are_refused():
    data = "\n".join(_line(f"c{i}") for i in range(4)).encode()
    with pytest.raises(BadFile, match="more than 3 requests"):
        parse(data, max_line_bytes=10_000, max_lines=3)
