"""OpenAI-compatible chat and text completions on top of :class:`SAEService`.

Each choice (``n``) is its own engine request with ``n=1`` (the engine streams one
sequence per request and returns features per request), run concurrently; with a
``seed``, choice ``i`` uses ``seed + i`` so the choices differ but stay reproducible.
``compare: true`` runs every choice a second time without the steering (same seeds) and
returns those under ``unsteered``. Streaming merges the choices' streams into one SSE
stream (``data: {chunk}`` lines, then ``data: [DONE]``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Union

from sae_runtime.engine.outputs import GenerationChunk
from sae_runtime.engine.spec import SAERequestSpec
from server.errors import ApiError, translate
from server.models import PromptInput, TokenFeaturesOut, Usage
from server.openai_models import (
    IGNORED,
    UNSUPPORTED_CHAT,
    UNSUPPORTED_COMPLETION,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionRequest,
    TokenLogprob,
    TopLogprob,
    UnsteeredChat,
    UnsteeredCompletion,
)
from server.service import ClosingStream, SAEService

AnyRequest = Union[ChatCompletionRequest, CompletionRequest]


@dataclass
class _Plan:
    """What one OpenAI request turns into, after every check has passed."""

    prompt_ids: list[int]
    max_tokens: int
    spec: SAERequestSpec | None
    plain_spec: SAERequestSpec | None  # the spec without steering, for compare runs
    logprobs: int | None
    runs: list[tuple[int, bool]] = field(default_factory=list)  # (choice index, steered?)


@dataclass
class _Accum:
    """A finished choice, accumulated from its chunks."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    features: list[TokenFeaturesOut] = field(default_factory=list)
    finish_reason: str | None = None


class OpenAIHandler:
    def __init__(self, service: SAEService):
        self.service = service

    # -- checks ---------------------------------------------------------------------------

    def _check_common(self, req: AnyRequest, unsupported: tuple[str, ...]) -> None:
        if req.model is not None and req.model != self.service.model_name:
            raise ApiError.not_found("model", f"model '{req.model}' is not served; this server serves "
                                              f"'{self.service.model_name}'")
        for name, value in req.extra_fields().items():
            if name in IGNORED:
                continue
            if name in unsupported:
                if value in (None, False, [], {}):
                    continue
                raise ApiError.unsupported(name, f"'{name}' is not supported by sae-serve")
            raise ApiError.invalid(name, f"unknown field '{name}'")
        if req.compare and (req.steering is None or req.steering.empty):
            raise ApiError.invalid("compare", "needs 'steering': it returns the steered and the unsteered completion")
        if req.compare and req.stream:
            raise ApiError.unsupported("compare", "is not supported with stream=true; send two requests instead")
        if req.stream_options is not None and not req.stream:
            raise ApiError.invalid("stream_options", "is only allowed with stream=true")

    def _plan(self, req: AnyRequest, prompt_ids: list[int], max_tokens: int | None,
              logprobs: int | None) -> _Plan:
        defaulted = max_tokens is None
        max_tokens = self.service.check_budget(prompt_ids, max_tokens)
        spec = self.service.build_spec(req.features, req.steering)
        plain = self.service.build_spec(req.features, None) if req.compare else None
        runs = [(i, True) for i in range(req.n)]
        if req.compare:
            runs += [(i, False) for i in range(req.n)]
        # Every run returns its own features: n choices, twice with compare.
        self.service.check_response_budget(req.features, len(prompt_ids), max_tokens, len(runs),
                                           max_tokens_defaulted=defaulted)
        return _Plan(prompt_ids, max_tokens, spec, plain, logprobs, runs)

    def _params(self, req: AnyRequest, plan: _Plan, index: int) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=1,
            max_tokens=plan.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop_list() or None,
            seed=None if req.seed is None else req.seed + index,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logprobs=plan.logprobs,
        )

    def plan_chat(self, req: ChatCompletionRequest) -> _Plan:
        self._check_common(req, UNSUPPORTED_CHAT)
        self.service.require_chat_template(
            "messages", "chat completions need one: use /v1/completions with a text prompt")
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError.invalid("top_logprobs", "needs logprobs=true")
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise ApiError.invalid("max_completion_tokens", "differs from max_tokens; give one of them")
        prompt_ids = self.service.encode(PromptInput(messages=req.messages))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return self._plan(req, prompt_ids, req.max_completion_tokens or req.max_tokens, logprobs)

    def plan_completion(self, req: CompletionRequest) -> _Plan:
        self._check_common(req, UNSUPPORTED_COMPLETION)
        if req.echo:
            raise ApiError.unsupported("echo", "echo=true is not supported")
        if req.best_of not in (None, 1) and req.best_of != req.n:
            raise ApiError.unsupported("best_of", "best_of other than n is not supported")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ApiError.unsupported("prompt", "a batch of prompts is not supported; send one request per prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = self.service.encode(PromptInput(text=prompt), "prompt")
        else:
            vocab = len(self.service.engine.tokenizer)
            bad = next((t for t in prompt if not 0 <= int(t) < vocab), None)
            if not prompt:
                raise ApiError.invalid("prompt", "is empty")
            if bad is not None:
                raise ApiError.invalid("prompt", f"token id {bad} is outside the vocabulary (size {vocab})")
            prompt_ids = [int(t) for t in prompt]
        # OpenAI's legacy default for completions is 16 tokens.
        return self._plan(req, prompt_ids, req.max_tokens or 16, req.logprobs)

    # -- running --------------------------------------------------------------------------

    async def _open_all(self, req: AnyRequest, plan: _Plan) -> list[AsyncIterator[GenerationChunk]]:
        """Open every run; if one is refused, close the others and re-raise."""
        async def open_one(index: int, steered: bool):
            spec = plan.spec if steered else plan.plain_spec
            _, stream = await self.service.open_stream(plan.prompt_ids, self._params(req, plan, index), spec)
            return stream

        results = await asyncio.gather(*(open_one(i, s) for i, s in plan.runs), return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            for r in results:
                if not isinstance(r, BaseException):
                    await r.aclose()  # type: ignore[attr-defined]
            raise failure
        return results  # type: ignore[return-value]

    async def _collect(self, req: AnyRequest, plan: _Plan) -> tuple[list[_Accum], list[_Accum]]:
        streams = await self._open_all(req, plan)

        async def drain(stream: AsyncIterator[GenerationChunk]) -> _Accum:
            acc = _Accum()
            async for chunk in stream:
                acc.text += chunk.text
                acc.token_ids += chunk.token_ids
                acc.logprobs += chunk.logprobs or []
                acc.features += self.service.features_out(chunk.features)
                acc.finish_reason = chunk.finish_reason or acc.finish_reason
            return acc

        # One failed run fails the request: its siblings are cancelled and aborted in the
        # engine at once rather than left generating for nobody (a TaskGroup does both).
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(drain(s)) for s in streams]
        except BaseExceptionGroup as eg:
            raise eg.exceptions[0] from None
        finally:
            for s in streams:
                await s.aclose()  # type: ignore[attr-defined]  # aborts unfinished requests
        done = [t.result() for t in tasks]
        steered = [a for a, (_, s) in zip(done, plan.runs) if s]
        plain = [a for a, (_, s) in zip(done, plan.runs) if not s]
        return steered, plain

    def _usage(self, plan: _Plan, accs: list[_Accum]) -> Usage:
        completion = sum(len(a.token_ids) for a in accs)
        return Usage(prompt_tokens=len(plan.prompt_ids), completion_tokens=completion,
                     total_tokens=len(plan.prompt_ids) + completion)

    # -- logprobs -------------------------------------------------------------------------

    def _chat_logprobs(self, token_ids: list[int], steps: list[dict[int, float]], top: int) -> ChatLogprobs:
        content = []
        for tid, step in zip(token_ids, steps):
            text = self.service.token_text(tid)
            ranked = sorted(step.items(), key=lambda kv: -kv[1])[:top]
            content.append(TokenLogprob(
                token=text, logprob=step.get(tid, float("-inf")), bytes=list(text.encode()),
                top_logprobs=[TopLogprob(token=self.service.token_text(t), logprob=lp,
                                         bytes=list(self.service.token_text(t).encode())) for t, lp in ranked],
            ))
        return ChatLogprobs(content=content)

    def _completion_logprobs(self, token_ids: list[int], steps: list[dict[int, float]], top: int,
                             offset: int) -> CompletionLogprobs:
        tokens, lps, tops, offsets = [], [], [], []
        for tid, step in zip(token_ids, steps):
            text = self.service.token_text(tid)
            tokens.append(text)
            lps.append(step.get(tid, float("-inf")))
            ranked = sorted(step.items(), key=lambda kv: -kv[1])[:top]
            tops.append({self.service.token_text(t): lp for t, lp in ranked})
            offsets.append(offset)
            offset += len(text)
        return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)

    # -- non-streaming --------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, plan: _Plan) -> ChatCompletion:
        steered, plain = await self._collect(req, plan)
        top = req.top_logprobs or 0

        def choices(accs: list[_Accum]) -> list[ChatChoice]:
            return [ChatChoice(
                index=i, message=AssistantMessage(content=a.text), finish_reason=a.finish_reason,
                logprobs=self._chat_logprobs(a.token_ids, a.logprobs, top) if req.logprobs else None,
                features=a.features if req.features is not None else None,
            ) for i, a in enumerate(accs)]

        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.service.model_name,
            choices=choices(steered), usage=self._usage(plan, steered),
            unsteered=UnsteeredChat(choices=choices(plain), usage=self._usage(plan, plain)) if req.compare else None,
        )

    async def completion(self, req: CompletionRequest, plan: _Plan) -> Completion:
        steered, plain = await self._collect(req, plan)
        top = req.logprobs or 0

        def choices(accs: list[_Accum]) -> list[CompletionChoice]:
            return [CompletionChoice(
                index=i, text=a.text, finish_reason=a.finish_reason,
                logprobs=self._completion_logprobs(a.token_ids, a.logprobs, top, 0) if req.logprobs is not None else None,
                features=a.features if req.features is not None else None,
            ) for i, a in enumerate(accs)]

        return Completion(
            id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.service.model_name,
            choices=choices(steered), usage=self._usage(plan, steered),
            unsteered=UnsteeredCompletion(choices=choices(plain), usage=self._usage(plan, plain)) if req.compare else None,
        )

    # -- streaming ------------------------------------------------------------------------

    async def stream(self, req: AnyRequest, plan: _Plan) -> AsyncIterator[str]:
        """Open the runs (errors raise here, before any byte is sent) and return SSE lines."""
        streams = await self._open_all(req, plan)
        # Closing what this returns closes the engine streams too, even if no line was read.
        return ClosingStream(self._sse(req, plan, streams), *streams)

    async def _sse(self, req: AnyRequest, plan: _Plan, streams: list[AsyncIterator[GenerationChunk]]) -> AsyncIterator[str]:
        is_chat = isinstance(req, ChatCompletionRequest)
        rid = (f"chatcmpl-{uuid.uuid4().hex}" if is_chat else f"cmpl-{uuid.uuid4().hex}")
        created = int(time.time())
        queue: asyncio.Queue = asyncio.Queue()
        done_marker = object()

        async def pump(index: int, stream: AsyncIterator[GenerationChunk]) -> None:
            try:
                async for chunk in stream:
                    await queue.put((index, chunk))
            except BaseException as exc:  # reported in-band: headers are already sent
                await queue.put((index, exc))
            finally:
                await queue.put((index, done_marker))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        remaining = len(tasks)
        started: set[int] = set()
        offsets = [0] * len(tasks)
        generated = [0] * len(tasks)
        top = (req.top_logprobs or 0) if is_chat else (req.logprobs or 0)
        want_lp = (req.logprobs if is_chat else req.logprobs is not None)
        try:
            while remaining:
                index, item = await queue.get()
                if item is done_marker:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    api = translate(item)  # e.g. features that never arrived: 503's message
                    msg = api.message if api else "the engine failed while generating"
                    kind = api.kind.value if api else "server_error"
                    yield f"data: {json.dumps({'error': {'message': msg, 'type': kind}})}\n\n"
                    return
                chunk: GenerationChunk = item
                generated[index] = chunk.num_generated_tokens
                feats = self.service.features_out(chunk.features) if req.features is not None else None
                if is_chat:
                    delta = ChatDelta(content=chunk.text)
                    if index not in started:
                        delta.role = "assistant"
                        started.add(index)
                    lp = self._chat_logprobs(chunk.token_ids, chunk.logprobs or [], top) if want_lp else None
                    out: Any = ChatCompletionChunk(id=rid, created=created, model=self.service.model_name, choices=[
                        ChatChunkChoice(index=index, delta=delta, finish_reason=chunk.finish_reason,
                                        logprobs=lp, features=feats)])
                else:
                    lp = self._completion_logprobs(chunk.token_ids, chunk.logprobs or [], top, offsets[index]) \
                        if want_lp else None
                    offsets[index] += len(chunk.text)
                    out = CompletionChunk(id=rid, created=created, model=self.service.model_name, choices=[
                        CompletionChunkChoice(index=index, text=chunk.text, finish_reason=chunk.finish_reason,
                                              logprobs=lp, features=feats)])
                yield f"data: {out.model_dump_json(exclude_none=True)}\n\n"
            if req.stream_options is not None and req.stream_options.include_usage:
                total = sum(generated)
                usage = Usage(prompt_tokens=len(plan.prompt_ids), completion_tokens=total,
                              total_tokens=len(plan.prompt_ids) + total)
                cls = ChatCompletionChunk if is_chat else CompletionChunk
                final = cls(id=rid, created=created, model=self.service.model_name, choices=[], usage=usage)
                yield f"data: {final.model_dump_json(exclude_none=True)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            # Let the cancelled readers leave their streams first: closing a stream that a
            # reader is still inside raises "aclose(): asynchronous generator is already running".
            await asyncio.gather(*tasks, return_exceptions=True)
            for s in streams:
                await s.aclose()  # type: ignore[attr-defined]  # aborts unfinished requests
