"""HTTP helpers every transport shares: OpenAPI bodies for hand-parsed JSON, clients that left."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from starlette.responses import Response

if TYPE_CHECKING:  # pragma: no cover
    from .chatstream import ChatStream


def json_body(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    """An OpenAPI ``requestBody`` for a JSON body parsed by hand with ``model``."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:  # the bodies' nested models are not recursive
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(definitions[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    schema = inline(schema)
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}}


def client_left(cs: ChatStream, endpoint: str) -> Response:
    """A client that left while sending its request: one log line, no traceback."""
    cs.logger.info("%s: the client left before its request was read", endpoint)
    return Response(status_code=499)  # nobody reads it; the status marks it in access logs
