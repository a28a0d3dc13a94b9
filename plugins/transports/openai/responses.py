"""OpenAI's Responses and Conversations APIs, stored in the session store.

``POST /v1/responses`` answers ``input`` (a string or message items) after ``instructions``,
continuing either a stored response (``previous_response_id``: every earlier exchange of the
chain) or a conversation (``conversation``: its items, to which the input and the answer are then
appended). With ``store`` (the default) the response is kept: ``GET``/``DELETE
/v1/responses/{id}`` and ``GET /v1/responses/{id}/input_items``. ``/v1/conversations`` creates,
reads, updates and deletes conversations and lists or adds their items.

Everything stored belongs to its owner, the API key that made it (the ``Authorization: Bearer`` or
``X-API-Key`` value; requests without a key share one anonymous owner): another key's ids answer
404, as if they did not exist. Generation goes through the same turn, admission queue and prompt
format as every other request (:mod:`chatstream.turn`).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from chatstream.access import presented_key
from chatstream.chatstream import ChatStream
from chatstream.conversations import ConversationBook, item_text, message_item, new_id, owner_of
from chatstream.errors import ChatStreamError, ClientDisconnected
from chatstream.http import json_body
from chatstream.sessions import ChatSession
from chatstream.streaming import ChatStreamingResponse
from chatstream.turn import EngineFailed, ServerShutdown, Turn

from .protocol import Message, OpenAIError, openai_error, parse_request
from .responses_protocol import (
    ConversationCreateRequest,
    ConversationUpdateRequest,
    ItemsCreateRequest,
    ResponseCreateRequest,
    check_metadata,
    page,
    parse_items,
)
from .serving import (
    OpenAIOptions,
    build_prompt,
    generation_error,
    openai_endpoint,
    served_model_id,
    whole_text,
)

TRANSPORT = "openai"
# Core's parameter names as the Responses API calls them.
NAMES = {"max_new_tokens": "max_output_tokens", "user_input": "input", "messages": "input"}


def owner_for(request: Request) -> str:
    key = presented_key(request.headers)
    return owner_of("key", key) if key else owner_of("anonymous", "")


def _not_found(kind: str, param: str, value: str) -> OpenAIError:
    return OpenAIError(
        404, f"{param}: no {kind} {value!r} (or it expired, or it is another key's)", param, "not_found"
    )


class ResponsesAPI:
    """The endpoints, bound to one ``ChatStream`` and its conversation book."""

    def __init__(self, cs: ChatStream, options: OpenAIOptions, book: ConversationBook) -> None:
        self.cs = cs
        self.options = options
        self.book = book

    @property
    def max_chars(self) -> int:
        return self.cs.settings.max_input_chars

    # -- responses --------------------------------------------------------------------------------
    async def create(self, request: Request) -> Response:
        """POST: a model response to ``input`` (server-sent events with ``stream``)."""
        cs = self.cs
        if not cs.ready:
            await cs.start()
        body: ResponseCreateRequest = await parse_request(
            request, self.options.max_body_bytes, ResponseCreateRequest, self.max_chars
        )
        owner = owner_for(request)
        metadata = check_metadata(body.metadata)
        new_items = parse_items(body.input, "input", self.max_chars)
        if new_items[-1]["role"] != "user":
            raise OpenAIError(
                400,
                "input: end with a user message (the answer is generated for it)",
                "input",
                "invalid_value",
            )
        conversation_id = body.conversation_id()
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            try:
                found = await self.book.history(owner, body.previous_response_id)
            except LookupError as exc:
                raise OpenAIError(
                    404,
                    f"previous_response_id: response {exc} in its chain was deleted or expired",
                    "previous_response_id",
                    "not_found",
                ) from None
            if found is None:
                raise _not_found("response", "previous_response_id", body.previous_response_id)
            history = found
        elif conversation_id is not None:
            conversation = await self.book.conversation(owner, conversation_id)
            if conversation is None:
                raise _not_found("conversation", "conversation", conversation_id)
            history = list(conversation.get("items", []))
        params = self._params(body)
        messages = [Message(role="system", content=body.instructions)] if body.instructions else []
        messages += [Message(role=item["role"], content=item_text(item)) for item in [*history, *new_items]]
        session = ChatSession(None, build_prompt(cs, messages))
        turn = cs.turn(session, params, transport=TRANSPORT, request=request)
        try:
            await turn.start()
        except ChatStreamError as exc:
            failure = openai_error(exc, NAMES)
            failure.reported = True
            raise failure from None
        except ClientDisconnected:
            return Response(status_code=499)
        answer = _Answer(self, turn, body, owner, new_items, conversation_id, metadata)
        if not body.stream:
            return await answer.whole()
        return ChatStreamingResponse(
            answer.events(),
            finalizer=turn.finish,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            send_timeout_s=cs.settings.client_read_timeout_s,
        )

    def _params(self, body: ResponseCreateRequest) -> Any:
        overrides = {
            "temperature": body.temperature,
            "top_p": body.top_p,
            "max_new_tokens": body.max_output_tokens,
            "seed": body.seed,
            "top_k": body.top_k,
            "min_p": body.min_p,
        }
        try:
            return self.cs.generation_params(None, **overrides)
        except ChatStreamError as exc:
            raise openai_error(exc, NAMES) from None

    async def retrieve(self, request: Request, response_id: str) -> Response:
        """GET: a stored response."""
        record = await self.book.response(owner_for(request), response_id)
        if record is None:
            raise _not_found("response", "response_id", response_id)
        return JSONResponse(_public(record))

    async def delete(self, request: Request, response_id: str) -> Response:
        """DELETE: forget a stored response."""
        if not await self.book.delete_response(owner_for(request), response_id):
            raise _not_found("response", "response_id", response_id)
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})

    async def input_items(self, request: Request, response_id: str) -> Response:
        """GET: a stored response's input items (``limit``, ``order``, ``after``)."""
        record = await self.book.response(owner_for(request), response_id)
        if record is None:
            raise _not_found("response", "response_id", response_id)
        return JSONResponse(page(record.get("input_items", []), dict(request.query_params)))

    # -- conversations ----------------------------------------------------------------------------
    async def create_conversation(self, request: Request) -> Response:
        """POST: a new conversation, with optional ``items`` and ``metadata``."""
        body: ConversationCreateRequest = await parse_request(
            request, self.options.max_body_bytes, ConversationCreateRequest, self.max_chars
        )
        items = parse_items(body.items, "items", self.max_chars) if body.items else []
        record = await self.book.create_conversation(
            owner_for(request), items, metadata=check_metadata(body.metadata)
        )
        return JSONResponse(_conversation(record))

    async def _conversation_of(self, request: Request, conversation_id: str) -> dict[str, Any]:
        record = await self.book.conversation(owner_for(request), conversation_id)
        if record is None:
            raise _not_found("conversation", "conversation_id", conversation_id)
        return record

    async def get_conversation(self, request: Request, conversation_id: str) -> Response:
        """GET: a conversation."""
        return JSONResponse(_conversation(await self._conversation_of(request, conversation_id)))

    async def update_conversation(self, request: Request, conversation_id: str) -> Response:
        """POST: replace a conversation's ``metadata``."""
        body: ConversationUpdateRequest = await parse_request(
            request, self.options.max_body_bytes, ConversationUpdateRequest, self.max_chars
        )
        record = await self.book.update_conversation(
            owner_for(request), conversation_id, metadata=check_metadata(body.metadata)
        )
        if record is None:
            raise _not_found("conversation", "conversation_id", conversation_id)
        return JSONResponse(_conversation(record))

    async def delete_conversation(self, request: Request, conversation_id: str) -> Response:
        """DELETE: a conversation and its items."""
        if not await self.book.delete_conversation(owner_for(request), conversation_id):
            raise _not_found("conversation", "conversation_id", conversation_id)
        return JSONResponse({"id": conversation_id, "object": "conversation.deleted", "deleted": True})

    async def list_items(self, request: Request, conversation_id: str) -> Response:
        """GET: a conversation's items (``limit``, ``order``, ``after``)."""
        record = await self._conversation_of(request, conversation_id)
        return JSONResponse(page(record.get("items", []), dict(request.query_params)))

    async def get_item(self, request: Request, conversation_id: str, item_id: str) -> Response:
        """GET: one item of a conversation."""
        record = await self._conversation_of(request, conversation_id)
        for item in record.get("items", []):
            if item.get("id") == item_id:
                return JSONResponse(item)
        raise _not_found("item", "item_id", item_id)

    async def add_items(self, request: Request, conversation_id: str) -> Response:
        """POST: add ``items`` to a conversation."""
        body: ItemsCreateRequest = await parse_request(
            request, self.options.max_body_bytes, ItemsCreateRequest, self.max_chars
        )
        items = parse_items(body.items, "items", self.max_chars)
        record = await self.book.update_conversation(owner_for(request), conversation_id, add_items=items)
        if record is None:
            raise _not_found("conversation", "conversation_id", conversation_id)
        return JSONResponse(
            {
                "object": "list",
                "data": items,
                "first_id": items[0]["id"],
                "last_id": items[-1]["id"],
                "has_more": False,
            }
        )


class _Answer:
    """One admitted response: its events or whole object, stored when it completes."""

    def __init__(
        self,
        api: ResponsesAPI,
        turn: Turn,
        body: ResponseCreateRequest,
        owner: str,
        input_items: list[dict[str, Any]],
        conversation_id: str | None,
        metadata: dict[str, str],
    ) -> None:
        self.api = api
        self.turn = turn
        self.body = body
        self.owner = owner
        self.input_items = input_items
        self.conversation_id = conversation_id
        self.id = new_id("resp")
        self.item_id = new_id("msg")
        self.created_at = int(time.time())
        self.metadata = metadata
        self.sequence = 0

    def response(self, status: str, text: str | None = None) -> dict[str, Any]:
        """The response object in its current state."""
        body = self.body
        output = [] if text is None else [message_item("assistant", text, item_id=self.item_id)]
        stats = self.turn.stats
        incomplete = status == "completed" and stats.finish_reason == "length"
        if incomplete:
            status = "incomplete"
        data: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": served_model_id(self.api.cs, self.api.options),
            "output": output,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "previous_response_id": body.previous_response_id,
            "conversation": {"id": self.conversation_id} if self.conversation_id else None,
            "store": body.store,
            "metadata": self.metadata,
            "parallel_tool_calls": False,
            "tool_choice": "none",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "truncation": body.truncation or "auto",
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "usage": None,
        }
        if text is not None:
            prompt = self.turn.prompt_tokens or stats.prompt_tokens or 0
            data["usage"] = {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": stats.cached_tokens or 0},
                "output_tokens": stats.tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + stats.tokens,
            }
        return data

    async def _keep(self, finished: dict[str, Any]) -> None:
        """Store the response (unless ``store`` is false) and extend its conversation."""
        api = self.api
        if self.body.store:
            await api.book.save_response(self.owner, {**finished, "input_items": self.input_items})
        if self.conversation_id is not None:
            await api.book.update_conversation(
                self.owner, self.conversation_id, add_items=[*self.input_items, *finished["output"]]
            )

    def _event(self, kind: str, **data: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

    async def events(self) -> AsyncGenerator[bytes, None]:
        """The server-sent events the official client parses; the turn finishes when this ends."""
        turn = self.turn
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        text = ""
        try:
            yield self._event("response.created", response=self.response("in_progress"))
            yield self._event("response.in_progress", response=self.response("in_progress"))
            item = {
                **message_item("assistant", "", item_id=self.item_id, status="in_progress"),
                "content": [],
            }
            yield self._event("response.output_item.added", output_index=0, item=item)
            part = {"type": "output_text", "text": "", "annotations": []}
            yield self._event("response.content_part.added", part=part, **where)
            async for piece in turn.stream():
                text += piece
                yield self._event("response.output_text.delta", delta=piece, logprobs=[], **where)
            yield self._event("response.output_text.done", text=text, logprobs=[], **where)
            yield self._event("response.content_part.done", part={**part, "text": text}, **where)
            finished = self.response("completed", text)
            yield self._event("response.output_item.done", output_index=0, item=finished["output"][0])
            await self._keep(finished)
            yield self._event("response.completed", response=finished)
        except (ServerShutdown, EngineFailed) as exc:
            error = generation_error(exc)
            yield self._event("error", code=error.code, message=error.message, param=None)
            failed = {**self.response("failed"), "error": {"code": error.code, "message": error.message}}
            yield self._event("response.failed", response=failed)
        finally:
            await turn.finish()

    async def whole(self) -> Response:
        """The whole response object, stored when it completes."""
        text = await whole_text(self.turn)
        if isinstance(text, Response):
            return text
        finished = self.response("completed", text)
        await self._keep(finished)
        return JSONResponse(finished)


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in ("owner", "input_items")}


def _conversation(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": record["id"],
        "object": "conversation",
        "created_at": int(record["created_at"]),
        "metadata": record.get("metadata", {}),
    }


def install_responses(
    app: FastAPI, cs: ChatStream, options: OpenAIOptions, check_access: Callable[[Request, str], None]
) -> None:
    """Mount the Responses and Conversations endpoints; role checks name the APIs ``responses``
    and ``conversations``."""
    api = ResponsesAPI(cs, options, cs.conversations)

    routes: list[tuple[str, str, Callable[..., Awaitable[Response]], str, type[Any] | None]] = [
        ("/v1/responses", "POST", api.create, "responses", ResponseCreateRequest),
        ("/v1/responses/{response_id}", "GET", api.retrieve, "responses", None),
        ("/v1/responses/{response_id}", "DELETE", api.delete, "responses", None),
        ("/v1/responses/{response_id}/input_items", "GET", api.input_items, "responses", None),
        ("/v1/conversations", "POST", api.create_conversation, "conversations", ConversationCreateRequest),
        ("/v1/conversations/{conversation_id}", "GET", api.get_conversation, "conversations", None),
        (
            "/v1/conversations/{conversation_id}",
            "POST",
            api.update_conversation,
            "conversations",
            ConversationUpdateRequest,
        ),
        ("/v1/conversations/{conversation_id}", "DELETE", api.delete_conversation, "conversations", None),
        ("/v1/conversations/{conversation_id}/items", "GET", api.list_items, "conversations", None),
        (
            "/v1/conversations/{conversation_id}/items",
            "POST",
            api.add_items,
            "conversations",
            ItemsCreateRequest,
        ),
        ("/v1/conversations/{conversation_id}/items/{item_id}", "GET", api.get_item, "conversations", None),
    ]
    for path, method, handler, access, body in routes:
        app.add_api_route(
            path,
            openai_endpoint(cs, check_access, access, NAMES, handler, generates=handler == api.create),
            methods=[method],
            name=handler.__name__,
            openapi_extra=json_body(body) if body is not None else None,
        )
