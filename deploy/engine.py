"""The generation engine behind the HTTP app: continuous batching with chunked prefill.

``Engine(backend, tokenizer, model_name)`` runs a scheduler thread over a *backend*
that owns the model and the decode states:

- ``LocalBackend(model)``: a ``model.Transformer`` in this process;
- ``deploy.actor_backend.ActorBackend(group)``: the stage actors of an actor graph
  (pipeline stages on their racks, experts sharded), the same ``StageWorker``s that train.

Every scheduler iteration (Orca-style iteration-level scheduling, Sarathi-style chunked
prefill):

1. drops requests whose client went away (the ``stream`` generator was closed) or whose
   deadline passed, freeing their decode states;
2. admits waiting requests while fewer than ``max_batch`` sequences are live and prefills
   them in chunks, at most ``prefill_chunk`` prompt tokens per iteration in all (a long
   prompt takes several iterations, so running sequences keep decoding in between): half
   of it to the oldest waiting request, the rest shortest remaining prompt first, so a
   short request does not wait behind a long prompt and no request starves;
3. runs **one decode step for every running sequence as one ragged batch** (each row at
   its own position with its own state; ``Transformer.forward`` with a list of states),
   samples each row with its request's ``Sampler`` and streams the text.

Requests therefore join and leave the running batch at every step. ``stream(prompt_ids,
req, deadline)`` yields ``Delta``s: text as it becomes final (a partial UTF-8 character or
the possible start of a stop string is held back), then a finishing ``Delta`` with
``finish_reason`` ``stop`` / ``length`` / ``timeout``.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import torch

from cluster.data import CHAT_TEMPLATE

from .sampling import Sampler, StopChecker

DEFAULT_CHAT_TEMPLATE = CHAT_TEMPLATE  # when the tokenizer directory has no tokenizer_config.json
MAX_BATCH = 32
PREFILL_CHUNK = 512


@dataclass
class Delta:
    """One streamed piece: ``text`` (may be empty), ``finish_reason`` (None, ``"stop"``, ``"length"``
    or ``"timeout"``); the finishing piece carries ``tokens``, the number of tokens generated."""

    text: str
    finish_reason: str | None = None
    tokens: int = 0


class LocalBackend:
    """Decode states and forward passes of one in-process ``model.Transformer``.

    Sequence ids are the engine's; states are batch-1 ``ModelState``s. Not thread-safe:
    only the engine's scheduler thread calls it.
    """

    def __init__(self, model):
        self.model = model.eval()
        self.args = model.args
        self.states: dict[int, object] = {}

    @torch.no_grad()
    def prefill(self, seq: int, ids: list[int], open_new: bool) -> torch.Tensor:
        """Feed a prompt chunk of sequence ``seq`` (a fresh state when ``open_new``);
        returns the last position's logits ``[V]`` float32."""
        if open_new:
            self.states[seq] = self.model.new_state(1)
        return self.model(torch.tensor([ids]), self.states[seq], logits_to_keep=1)[0, -1].float()

    @torch.no_grad()
    def decode(self, seqs: list[int], toks: list[int]) -> torch.Tensor:
        """One token for each of ``seqs`` as one ragged batch; returns logits ``[B, V]`` float32."""
        states = [self.states[s] for s in seqs]
        ids = torch.tensor(toks).view(-1, 1)
        return self.model(ids, states[0] if len(states) == 1 else states, logits_to_keep=1)[:, -1].float()

    def free(self, seqs: list[int]) -> None:
        for s in seqs:
            self.states.pop(s, None)

    def state_bytes(self) -> int:
        return sum(st.nbytes() for st in list(self.states.values()))  # called from other threads too

    def close(self) -> None:
        self.states.clear()


@dataclass(eq=False)
class _Request:
    seq: int
    prompt: list[int]
    sampler: Sampler
    stop: StopChecker
    limit: int
    deadline: float | None
    out: queue.Queue = field(default_factory=queue.Queue)
    loop: asyncio.AbstractEventLoop | None = None  # set: deliver to ``aout`` on this loop instead of ``out``
    aout: asyncio.Queue | None = None
    done: int = 0  # prompt tokens prefilled
    opened: bool = False
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already streamed
    next_tok: int | None = None
    cancelled: bool = False
    finished: bool = False
    t_submit: float = 0.0
    t_first: float | None = None
    t_last: float = 0.0  # when the last token was sampled


class Engine:
    """Continuous-batching generation over a backend (see module docstring).

    Args:
        backend: ``LocalBackend`` or ``deploy.actor_backend.ActorBackend``.
        tokenizer: a ``tokenizers.Tokenizer``.
        model_name: the id ``/v1/models`` reports.
        context: serving context length (default: the model's ``max_position_embeddings``).
        eos_token: the end-of-text token (generation stops there).
        chat_template: Jinja template rendering ``messages`` (run sandboxed).
        max_batch: sequences decoded together at most (more wait, in order).
        prefill_chunk: prompt tokens prefilled per scheduler iteration at most.
        metrics: a ``cluster.ops.metrics.ServingMetrics`` (default: one tagged ``model_name``; it
            exports through ``ray.util.metrics`` when Ray is initialised in this process).
    """

    def __init__(self, backend, tokenizer, model_name: str, *, context: int | None = None,
                 eos_token: str = "<|endoftext|>", chat_template: str | None = None,
                 max_batch: int = MAX_BATCH, prefill_chunk: int = PREFILL_CHUNK, metrics=None):
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch}, {prefill_chunk}")
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context = context or backend.args.max_position_embeddings
        self.vocab_size = backend.args.vocab_size
        self.eos_id = tokenizer.token_to_id(eos_token)
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._inbox: list[_Request] = []
        self._waiting: list[_Request] = []
        self._running: list[_Request] = []
        self._live: dict[int, _Request] = {}  # sequences with a decode state in the backend
        self._thread: threading.Thread | None = None
        self._stop = False
        self._error: BaseException | None = None
        self.completed = 0
        self.generated_tokens = 0
        self.decode_steps = 0
        self.decode_rows = 0
        if metrics is None:
            from cluster.ops.metrics import ServingMetrics

            metrics = ServingMetrics(model_name)
        self.metrics = metrics

    # ------------------------------------------------------------------ API
    def stats(self) -> dict:
        """``live_sequences`` (holding a decode state), ``running`` / ``waiting`` requests,
        ``decode_state_bytes``, ``completed`` (finished, timed out or dropped),
        ``generated_tokens``, ``mean_decode_batch`` (rows per decode step so far)."""
        with self._cv:
            live, running, waiting = len(self._live), len(self._running), len(self._waiting) + len(self._inbox)
        return {"live_sequences": live, "running": running, "waiting": waiting,
                "decode_state_bytes": self.backend.state_bytes(), "completed": self.completed,
                "generated_tokens": self.generated_tokens,
                "mean_decode_batch": round(self.decode_rows / self.decode_steps, 3) if self.decode_steps else 0.0}

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the scheduler (the backend failed), or None while healthy."""
        return self._error

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def chat_prompt(self, messages: list) -> str:
        """Render chat messages with the (Jinja) chat template."""
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(autoescape=False, undefined=jinja2.StrictUndefined)  # templates are data
        return env.from_string(self.chat_template).render(messages=messages)

    def stream(self, prompt_ids: list[int], req, deadline: float | None = None) -> Iterator[Delta]:
        """Generate for ``prompt_ids`` with a validated request's sampling fields; yields ``Delta``s.

        ``deadline``: ``time.monotonic()`` seconds after which the request stops with
        ``finish_reason`` ``"timeout"``. Closing the generator early (a client that
        disconnects) cancels the request; its decode state is freed at the next step.

        Raises:
            RuntimeError: the scheduler failed (the backend's error is chained).
        """
        r = self._submit(prompt_ids, req, deadline)
        try:
            while True:
                d = self._check(r.out.get())
                yield d
                if d.finish_reason is not None:
                    return
        finally:
            self._cancel(r)

    async def astream(self, prompt_ids: list[int], req, deadline: float | None = None) -> AsyncIterator[Delta]:
        """``stream`` for asyncio code (the HTTP app): deltas arrive on the running event loop.

        Cancelling the consuming task (Starlette does when the client disconnects) or
        closing the generator cancels the request; its decode state is freed at the next step.
        """
        loop = asyncio.get_running_loop()
        r = self._submit(prompt_ids, req, deadline, loop=loop, aout=asyncio.Queue())
        try:
            while True:
                d = self._check(await r.aout.get())
                yield d
                if d.finish_reason is not None:
                    return
        finally:
            self._cancel(r)

    def _submit(self, prompt_ids, req, deadline, **delivery) -> _Request:
        bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
        r = _Request(seq=next(self._ids), prompt=list(prompt_ids),
                     sampler=Sampler(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed,
                                     logit_bias=bias, vocab_size=self.vocab_size),
                     stop=StopChecker(req.stops(), req.stop_token_ids),
                     limit=min(req.max_tokens or self.context, self.context - len(prompt_ids)),
                     deadline=deadline, t_submit=time.monotonic(), **delivery)
        with self._cv:
            if self._error is not None:
                raise RuntimeError(f"the engine failed earlier: {self._error}") from self._error
            self._start()
            self._inbox.append(r)
            self._cv.notify()
        return r

    @staticmethod
    def _check(d):
        if isinstance(d, BaseException):
            raise RuntimeError(f"generation failed: {d}") from d
        return d

    def _cancel(self, r: _Request) -> None:
        if not r.finished:
            with self._cv:
                r.cancelled = True
                self._cv.notify()

    @staticmethod
    def _put(r: _Request, item) -> None:
        """Deliver a ``Delta`` (or the engine's exception) to ``r``'s consumer."""
        if r.loop is None:
            r.out.put(item)
            return
        try:
            r.loop.call_soon_threadsafe(r.aout.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            r.cancelled = True

    def close(self) -> None:
        """Stop the scheduler thread and free every decode state."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.backend.close()

    # ------------------------------------------------------------ scheduler
    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tide-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not (self._inbox or self._waiting or self._running):
                    self._cv.wait()
                if self._stop:
                    return
                self._waiting.extend(self._inbox)
                self._inbox.clear()
            try:
                self._iteration()
            except BaseException as e:  # noqa: BLE001 - every request must hear about it
                with self._cv:
                    self._error = e
                    failed = self._waiting + self._running + self._inbox
                    self._waiting, self._running, self._inbox = [], [], []
                for r in failed:
                    r.finished = True
                    self._put(r, e)
                    self.metrics.inc("tide_serve_requests", finish_reason="error")
                self.metrics.gauges(0, 0, lambda: 0, force=True)
                return

    def _iteration(self) -> None:
        now = time.monotonic()
        with self._cv:
            for r in self._waiting + self._running:
                if r.cancelled:
                    self._finish(r)
                elif r.deadline is not None and now > r.deadline:
                    self._finish(r, Delta(self._text(r)[r.sent:], "timeout", len(r.ids)))
        # Prefill budget: half to the oldest waiting request (nothing starves), the rest shortest
        # remaining prompt first (a short request is not stuck behind a long prompt).
        budget = self.prefill_chunk
        order = self._waiting[:1] + sorted(self._waiting[1:], key=lambda q: len(q.prompt) - q.done)
        for k, r in enumerate(order):
            if budget <= 0:
                break
            if not r.opened and len(self._live) >= self.max_batch:
                continue
            share = max(1, self.prefill_chunk // 2) if k == 0 and len(order) > 1 else budget
            n = min(share, budget, len(r.prompt) - r.done)
            logits = self.backend.prefill(r.seq, r.prompt[r.done:r.done + n], not r.opened)
            self.metrics.inc("tide_serve_prompt_tokens", n)
            if not r.opened:
                r.opened = True
                with self._cv:
                    self._live[r.seq] = r
            r.done += n
            budget -= n
            if r.done == len(r.prompt):
                with self._cv:
                    self._waiting.remove(r)
                    self._running.append(r)
                self._emit(r, logits)
        rows = [r for r in self._running if r.next_tok is not None]
        if rows:
            logits = self.backend.decode([r.seq for r in rows], [r.next_tok for r in rows])
            self.decode_steps += 1
            self.decode_rows += len(rows)
            for r, lg in zip(rows, logits, strict=True):
                self._emit(r, lg)
        with self._cv:
            running, queued = len(self._running), len(self._waiting) + len(self._inbox)
        self.metrics.gauges(running, queued, self.backend.state_bytes, force=not (running or queued))

    def _text(self, r: _Request) -> str:
        return self.tokenizer.decode(r.ids)

    def _emit(self, r: _Request, logits: torch.Tensor) -> None:
        """Sample the next token of ``r`` from ``logits [V]``; stream its text; finish or queue it."""
        tok = r.sampler.sample(logits)
        r.ids.append(tok)
        self.generated_tokens += 1
        now = time.monotonic()
        if r.t_first is None:
            r.t_first = now
            self.metrics.observe("tide_serve_ttft_seconds", now - r.t_submit)
        else:
            self.metrics.observe("tide_serve_inter_token_seconds", now - r.t_last)
        r.t_last = now
        self.metrics.inc("tide_serve_generated_tokens")
        r.next_tok = None
        if tok == self.eos_id:
            return self._finish(r, Delta("", "stop", len(r.ids)))
        text = self._text(r)
        done, upto, reason = r.stop.check(tok, text)
        while upto > r.sent and text[upto - 1] == "\ufffd":  # a character still missing bytes
            upto -= 1
        if upto > r.sent:
            self._put(r, Delta(text[r.sent:upto]))
            r.sent = upto
        if done:
            return self._finish(r, Delta("", reason, len(r.ids)))
        if len(r.ids) >= r.limit:
            return self._finish(r, Delta(text[r.sent:], "length", len(r.ids)))
        r.next_tok = tok

    def _finish(self, r: _Request, last: Delta | None = None) -> None:
        """Free ``r``'s decode state, take it out of the batch, send its last piece (unless dropped)."""
        if r.opened:
            self.backend.free([r.seq])
        with self._cv:
            self._live.pop(r.seq, None)
            for lst in (self._waiting, self._running):
                if r in lst:
                    lst.remove(r)
            r.finished = True
            self.completed += 1
        self.metrics.inc("tide_serve_requests", finish_reason=last.finish_reason if last is not None else "cancelled")
        if last is not None:
            self._put(r, last)


class LocalEngine(Engine):
    """``Engine`` over a ``Transformer`` in this process: ``LocalEngine(model, tokenizer, model_name, ...)``
    (the other keyword arguments are ``Engine``'s)."""

    def __init__(self, model, tokenizer, model_name: str, **kwargs):
        super().__init__(LocalBackend(model), tokenizer, model_name, **kwargs)
        self.model = self.backend.model
