"""Reads Prometheus text-format scrapes and prints what the official Python client's parser (prometheus_client.parser,
Debian package python3-prometheus-client) makes of them, as JSON on stdout: for each scrape a list of families
[{"name", "type", "samples": [{"name", "labels", "value"}]}], a counter named with its _total suffix as scraped.
Usage: parse_metrics.py FILE... (a JSON list, one entry per file), or no argument for one scrape on stdin.
The parser raises on malformed input; this script then exits 1 with the parser's message on stderr."""
import json
import sys

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    sys.exit("prometheus_client is not installed for this Python (Debian: apt-get install python3-prometheus-client)")


def parse(text, where):
    try:
        return [
            {
                "name": f.name + "_total" if f.type == "counter" else f.name,
                "type": f.type,
                "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples],
            }
            for f in text_string_to_metric_families(text)
        ]
    except Exception as e:  # the parser's own errors are ValueError, but any failure means the scrape does not parse
        sys.exit(f"{where} does not parse: {type(e).__name__}: {e}")


if len(sys.argv) > 1:
    result = []
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as f:
            result.append(parse(f.read(), path))
else:
    result = parse(sys.stdin.read(), "the scrape")
json.dump(result, sys.stdout, allow_nan=True)
