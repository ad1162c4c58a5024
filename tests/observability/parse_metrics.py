"""Reads a Prometheus text-format scrape on stdin and prints what the official Python client's parser
(prometheus_client.parser, Debian package python3-prometheus-client) makes of it, as JSON on stdout:
[{"name", "type", "samples": [{"name", "labels", "value"}]}]. A counter is named with its _total suffix, as scraped.
The parser raises on malformed input; this script then exits 1 with the parser's message on stderr."""
import json
import sys

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    sys.exit("prometheus_client is not installed for this Python (Debian: apt-get install python3-prometheus-client)")

try:
    families = [
        {
            "name": f.name + "_total" if f.type == "counter" else f.name,
            "type": f.type,
            "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples],
        }
        for f in text_string_to_metric_families(sys.stdin.read())
    ]
except Exception as e:  # the parser's own errors are ValueError, but any failure means the scrape does not parse
    sys.exit(f"the scrape does not parse: {type(e).__name__}: {e}")
json.dump(families, sys.stdout, allow_nan=True)
