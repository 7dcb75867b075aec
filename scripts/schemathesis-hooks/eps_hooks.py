"""schemathesis hooks for eps (loaded by scripts/schemathesis through SCHEMATHESIS_HOOKS).

schemathesis has no serializer for JSON Lines. The OpenAPI document describes the body of
POST /events (application/x-ndjson) as OpenAPI 3.2 reads a sequential media type: an array whose
items are the lines' JSON values. This writes such an array as JSON Lines, one compact value per line.
A generated value that is not an array has no JSON Lines form; it is sent as indented (multi-line)
JSON, of which no line is a value on its own, so the server sees a body that is not JSON Lines.
"""

import json

import schemathesis


@schemathesis.serializer("application/x-ndjson")
def json_lines(ctx, value):
    if isinstance(value, list):
        return b"".join(json.dumps(item, separators=(",", ":")).encode() + b"\n" for item in value)
    return json.dumps(value, indent=1).encode() + b"\n"
