"""OpenAI-compatible chat and text completions on top of :class:`SAEService`.

Requests are vLLM's OpenAI models (``server/openai_models.py``); their sampling parameters
become ``SamplingParams`` through vLLM's own ``to_sampling_params``, so everything vLLM's
server applies (top_k, min_p, logit_bias, ignore_eos, response_format...) applies here
too, together with ``steering`` and ``features``. Each choice (``n``) is its own engine
request with ``n=1`` (the engine streams one
sequence per request and returns features per request), run concurrently; with a
``seed``, choice ``i`` uses ``seed + i`` so the choices differ but stay reproducible.
``compare: true`` runs every choice a second time without the steering (same seeds) and
returns those under ``unsteered``. Streaming merges the choices' streams into one SSE
stream (``data: {chunk}`` lines, then ``data: [DONE]``); with ``compare`` the unsteered
copies stream in it too, interleaved, each chunk choice marked ``unsteered: true`` (same
``index`` as the steered choice it mirrors).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sae_runtime.engine.outputs import GenerationChunk
from sae_runtime.engine.spec import SAERequestSpec
from server.errors import ApiError, ErrorKind, translate
from server.models import PromptInput, SteeringApplied, TokenFeaturesOut
from server.openai_models import (
    IGNORED,
    REFUSED_CHAT,
    REFUSED_COMPLETION,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogProbs,
    CompletionRequest,
    UnsteeredChat,
    UnsteeredCompletion,
    Usage,
)
from server.service import ClosingStream, SAEService

AnyRequest = ChatCompletionRequest | CompletionRequest


@dataclass
class _Run:
    """One engine request: choice ``index`` of prompt ``prompt``, steered or not."""

    index: int  # the choice's index in the response (prompt * n + i)
    prompt: int
    seed_offset: int  # i: choice i of a prompt uses seed + i
    steered: bool


@dataclass
class _Plan:
    """What one OpenAI request turns into, after every check has passed."""

    prompts: list[list[int]]
    max_tokens: int
    spec: SAERequestSpec | None
    plain_spec: SAERequestSpec | None  # the spec without steering, for compare runs
    params: Any  # vLLM SamplingParams from the request (n and seed set per run)
    echo: list[str] | None = None  # completions with echo=true: each prompt's text
    runs: list[_Run] = field(default_factory=list)
    steering_applied: SteeringApplied | None = None

    @property
    def logprobs(self) -> int | None:
        return self.params.logprobs

    def runs_of(self, steered: bool) -> list[_Run]:
        """The requested choices (``steered``, even without steering) or their compare copies."""
        return [r for r in self.runs if r.steered == steered]

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompts[0]

    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


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

    def _check_common(self, req: AnyRequest, refused: dict[str, str]) -> None:
        if req.model is not None and req.model != self.service.model_name:
            raise ApiError.not_found(
                "model", f"model '{req.model}' is not served; this server serves '{self.service.model_name}'"
            )
        for name, value in (req.model_extra or {}).items():
            if name in IGNORED:
                continue
            if name in refused:
                if value in (None, False, [], {}):
                    continue
                raise ApiError.unsupported(name, f"'{name}' is not supported by sae-serve: {refused[name]}")
            raise ApiError.invalid(name, f"unknown field '{name}'")
        for name in refused:  # in the table's order: 'tools' before the 'tool_choice' vLLM derives from it
            if name not in req.model_fields_set or name not in type(req).model_fields:
                continue
            info = type(req).model_fields[name]
            default = info.get_default(call_default_factory=True)
            if getattr(req, name) != default:
                raise ApiError.unsupported(name, f"'{name}' is not supported by sae-serve: {refused[name]}")
        if req.compare and (req.steering is None or req.steering.empty):
            raise ApiError.invalid("compare", "needs 'steering': it returns the steered and the unsteered completion")

    def _sampling_params(self, req: AnyRequest, max_tokens: int) -> Any:
        """vLLM's own mapping of the request to SamplingParams (its checks raise 400s)."""
        try:
            # No server defaults: OpenAI's defaults (temperature 1, top_p 1...) as vLLM applies them.
            params = req.to_sampling_params(max_tokens, {})
        except ApiError:
            raise
        except Exception as exc:
            api = translate(exc)
            if api is None:
                raise
            raise api from None
        params.n = 1  # one engine request per choice (features come back per request)
        return params

    def _plan(
        self,
        req: AnyRequest,
        prompts: list[list[int]],
        max_tokens: int | None,
        echo: list[str] | None = None,
        field: str = "max_tokens",
    ) -> _Plan:
        defaulted = max_tokens is None
        budgets = [self.service.check_budget(p, max_tokens, field) for p in prompts]
        max_tokens = min(budgets)
        spec = self.service.build_spec(req.features, req.steering)
        plain = self.service.build_spec(req.features, None) if req.compare else None
        runs = [_Run(p * req.n + i, p, i, True) for p in range(len(prompts)) for i in range(req.n)]
        if req.compare:
            runs += [_Run(r.index, r.prompt, r.seed_offset, False) for r in list(runs)]
        # Every run returns its own features: n choices per prompt, twice with compare
        # (counted with the longest prompt: an upper bound for a batch).
        self.service.check_response_budget(
            req.features, max(len(p) for p in prompts), max_tokens, len(runs), max_tokens_defaulted=defaulted
        )
        params = self._sampling_params(req, max_tokens)
        return _Plan(prompts, max_tokens, spec, plain, params, echo, runs, self.service.steering_applied(spec))

    def _params(self, req: AnyRequest, plan: _Plan, run: _Run) -> Any:
        params = plan.params.clone()
        params.n = 1
        if req.seed is not None:
            params.seed = req.seed + run.seed_offset
        return params

    def plan_chat(self, req: ChatCompletionRequest) -> _Plan:
        self._check_common(req, REFUSED_CHAT)
        self.service.require_chat_template(
            "messages", "chat completions need one: use /v1/completions with a text prompt"
        )
        try:
            field_name, max_tokens = req.given_max_tokens()
        except ValueError as exc:
            raise ApiError.invalid("max_completion_tokens", str(exc)) from None
        prompt_ids = self.service.encode(PromptInput(messages=req.messages))
        return self._plan(req, [prompt_ids], max_tokens, field=field_name)

    def _prompt_ids(self, prompt: str | list[int], field: str) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError.invalid(field, "is empty")
            return self.service.encode(PromptInput(text=prompt), field)
        vocab = len(self.service.engine.tokenizer)
        if not prompt:
            raise ApiError.invalid(field, "is empty")
        bad = next((t for t in prompt if not 0 <= int(t) < vocab), None)
        if bad is not None:
            raise ApiError.invalid(field, f"token id {bad} is outside the vocabulary (size {vocab})")
        return [int(t) for t in prompt]

    def plan_completion(self, req: CompletionRequest) -> _Plan:
        self._check_common(req, REFUSED_COMPLETION)
        if req.best_of not in (None, 1) and req.best_of != req.n:
            raise ApiError.unsupported("best_of", "best_of other than n is not supported")
        if req.echo and req.logprobs is not None:
            raise ApiError.unsupported(
                "echo",
                "echo=true with logprobs is not supported: sae-serve does not "
                "return prompt logprobs (echo without logprobs works)",
            )
        prompt = req.prompt
        batch: list[str | list[int]]
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            batch = [p for p in prompt if isinstance(p, (str, list))]  # a batch of texts or of token-id lists
        elif isinstance(prompt, str):
            batch = [prompt]
        else:  # one prompt of token ids
            batch = [[t for t in prompt if isinstance(t, int)]]
        if not batch:
            raise ApiError.invalid("prompt", "is empty")
        many = len(batch) > 1
        prompts = [self._prompt_ids(p, f"prompt[{i}]" if many else "prompt") for i, p in enumerate(batch)]
        echo = None
        if req.echo:
            echo = [
                p if isinstance(p, str) else self.service.engine.tokenizer.decode(ids)
                for p, ids in zip(batch, prompts, strict=True)
            ]
        # OpenAI's legacy default for completions is 16 tokens.
        return self._plan(req, prompts, req.max_tokens or 16, echo)

    # -- running --------------------------------------------------------------------------

    async def _open_all(self, req: AnyRequest, plan: _Plan) -> list[AsyncIterator[GenerationChunk]]:
        """Open every run; if one is refused, close the others and re-raise."""

        async def open_one(run: _Run):
            spec = plan.spec if run.steered else plan.plain_spec
            _, stream = await self.service.open_stream(plan.prompts[run.prompt], self._params(req, plan, run), spec)
            return stream

        results = await asyncio.gather(*(open_one(r) for r in plan.runs), return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            for r in results:
                if not isinstance(r, BaseException):
                    await r.aclose()
            if (
                isinstance(failure, ApiError)
                and failure.field is None
                and failure.kind == ErrorKind.INVALID
                and plan.params.structured_outputs is not None
            ):
                # The engine compiles the grammar; its error ("Grammar error: Invalid type...")
                # names no parameter: it is the request's response_format / structured_outputs.
                name = "response_format" if req.response_format is not None else "structured_outputs"
                raise ApiError.invalid(name, failure.message) from None
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
                acc.features += self.service.features_out(chunk.features, req.features)
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
        steered = [a for a, r in zip(done, plan.runs, strict=True) if r.steered]
        plain = [a for a, r in zip(done, plan.runs, strict=True) if not r.steered]
        return steered, plain

    def _usage(self, plan: _Plan, accs: list[_Accum]) -> Usage:
        completion = sum(len(a.token_ids) for a in accs)
        prompt = plan.prompt_tokens()
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    # -- logprobs -------------------------------------------------------------------------

    def _chat_logprobs(self, token_ids: list[int], steps: list[dict[int, float]], top: int) -> ChatCompletionLogProbs:
        content = []
        for tid, step in zip(token_ids, steps, strict=True):
            text = self.service.token_text(tid)
            ranked = sorted(step.items(), key=lambda kv: -kv[1])[:top]
            content.append(
                ChatCompletionLogProbsContent(
                    token=text,
                    logprob=max(step.get(tid, -9999.0), -9999.0),
                    bytes=list(text.encode()),
                    top_logprobs=[
                        ChatCompletionLogProb(
                            token=self.service.token_text(t),
                            logprob=max(lp, -9999.0),
                            bytes=list(self.service.token_text(t).encode()),
                        )
                        for t, lp in ranked
                    ],
                )
            )
        return ChatCompletionLogProbs(content=content)

    def _completion_logprobs(
        self, token_ids: list[int], steps: list[dict[int, float]], top: int, offset: int
    ) -> CompletionLogProbs:
        tokens: list[str] = []
        lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for tid, step in zip(token_ids, steps, strict=True):
            text = self.service.token_text(tid)
            tokens.append(text)
            lps.append(max(step.get(tid, -9999.0), -9999.0))
            ranked = sorted(step.items(), key=lambda kv: -kv[1])[:top]
            tops.append({self.service.token_text(t): max(lp, -9999.0) for t, lp in ranked})
            offsets.append(offset)
            offset += len(text)
        return CompletionLogProbs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)

    # -- non-streaming --------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, plan: _Plan) -> ChatCompletion:
        steered, plain = await self._collect(req, plan)
        top = plan.logprobs or 0

        def choices(accs: list[_Accum], runs: list[_Run]) -> list[ChatChoice]:
            return [
                ChatChoice(
                    index=r.index,
                    message=AssistantMessage(role="assistant", content=a.text),
                    finish_reason=a.finish_reason,
                    logprobs=self._chat_logprobs(a.token_ids, a.logprobs, top) if plan.logprobs is not None else None,
                    features=a.features if req.features is not None else None,
                )
                for a, r in zip(accs, runs, strict=True)
            ]

        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.service.model_name,
            choices=choices(steered, plan.runs_of(True)),
            usage=self._usage(plan, steered),
            unsteered=UnsteeredChat(choices=choices(plain, plan.runs_of(False)), usage=self._usage(plan, plain))
            if req.compare
            else None,
            steering_applied=plan.steering_applied,
        )

    async def completion(self, req: CompletionRequest, plan: _Plan) -> Completion:
        steered, plain = await self._collect(req, plan)
        top = plan.logprobs or 0

        def choices(accs: list[_Accum], runs: list[_Run]) -> list[CompletionChoice]:
            return [
                CompletionChoice(
                    index=r.index,
                    text=(plan.echo[r.prompt] if plan.echo else "") + a.text,
                    finish_reason=a.finish_reason,
                    logprobs=self._completion_logprobs(a.token_ids, a.logprobs, top, 0)
                    if plan.logprobs is not None
                    else None,
                    features=a.features if req.features is not None else None,
                )
                for a, r in zip(accs, runs, strict=True)
            ]

        return Completion(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.service.model_name,
            choices=choices(steered, plan.runs_of(True)),
            usage=self._usage(plan, steered),
            unsteered=UnsteeredCompletion(choices=choices(plain, plan.runs_of(False)), usage=self._usage(plan, plain))
            if req.compare
            else None,
            steering_applied=plan.steering_applied,
        )

    # -- streaming ------------------------------------------------------------------------

    async def stream(self, req: AnyRequest, plan: _Plan) -> AsyncIterator[str]:
        """Open the runs (errors raise here, before any byte is sent) and return SSE lines."""
        streams = await self._open_all(req, plan)
        # Closing what this returns closes the engine streams too, even if no line was read.
        return ClosingStream(self._sse(req, plan, streams), *streams)

    async def _sse(
        self, req: AnyRequest, plan: _Plan, streams: list[AsyncIterator[GenerationChunk]]
    ) -> AsyncIterator[str]:
        is_chat = isinstance(req, ChatCompletionRequest)
        rid = f"chatcmpl-{uuid.uuid4().hex}" if is_chat else f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        queue: asyncio.Queue = asyncio.Queue()
        done_marker = object()

        async def pump(slot: int, stream: AsyncIterator[GenerationChunk]) -> None:
            try:
                async for chunk in stream:
                    await queue.put((slot, chunk))
            except BaseException as exc:  # reported in-band: headers are already sent
                await queue.put((slot, exc))
            finally:
                await queue.put((slot, done_marker))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        remaining = len(tasks)
        started: set[int] = set()
        offsets = [0] * len(tasks)
        generated = [0] * len(tasks)
        top = plan.logprobs or 0
        want_lp = plan.logprobs is not None
        applied_sent = False
        try:
            while remaining:
                slot, item = await queue.get()
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
                run = plan.runs[slot]
                generated[slot] = chunk.num_generated_tokens
                feats = self.service.features_out(chunk.features, req.features) if req.features is not None else None
                first = slot not in started
                started.add(slot)
                if is_chat:
                    delta = ChatDelta(role="assistant" if first else None, content=chunk.text)
                    lp = self._chat_logprobs(chunk.token_ids, chunk.logprobs or [], top) if want_lp else None
                    out: Any = ChatCompletionChunk(
                        id=rid,
                        created=created,
                        model=self.service.model_name,
                        choices=[
                            ChatChunkChoice(
                                index=run.index,
                                delta=delta,
                                finish_reason=chunk.finish_reason,
                                logprobs=lp,
                                features=feats,
                                unsteered=None if run.steered else True,
                            )
                        ],
                    )
                else:
                    text = chunk.text
                    if first and plan.echo:
                        text = plan.echo[run.prompt] + text
                        offsets[slot] += len(plan.echo[run.prompt])
                    clp = (
                        self._completion_logprobs(chunk.token_ids, chunk.logprobs or [], top, offsets[slot])
                        if want_lp
                        else None
                    )
                    offsets[slot] += len(chunk.text)
                    out = CompletionChunk(
                        id=rid,
                        created=created,
                        model=self.service.model_name,
                        choices=[
                            CompletionChunkChoice(
                                index=run.index,
                                text=text,
                                finish_reason=chunk.finish_reason,
                                logprobs=clp,
                                features=feats,
                                unsteered=None if run.steered else True,
                            )
                        ],
                    )
                if not applied_sent:
                    out.steering_applied = plan.steering_applied
                    applied_sent = True
                yield f"data: {out.model_dump_json(exclude_none=True)}\n\n"
            if req.stream_options is not None and req.stream_options.include_usage:
                total = sum(generated)
                prompt = plan.prompt_tokens()
                usage = Usage(prompt_tokens=prompt, completion_tokens=total, total_tokens=prompt + total)
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
