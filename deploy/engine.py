"""A one-process generation engine behind the HTTP app (issue 5, first piece).

``LocalEngine(model, tokenizer, model_name)`` runs one request at a time on a
``model.Transformer``: chunked prefill into a fresh decode state, then one token per
step with the request's ``deploy.sampling.Sampler``, stopping at ``max_tokens``,
the context length, the end-of-text token, a stop token id or a stop string.
``stream`` yields text deltas as they become final (a partial UTF-8 character or
the possible start of a stop string is held back). The batching engine over the
stage actors (continuous batching) will replace it behind the same interface.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .sampling import Sampler, StopChecker

DEFAULT_CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}<|assistant|>\n"


@dataclass
class Delta:
    """One streamed piece: ``text`` (may be empty), ``finish_reason`` (None, ``"stop"`` or ``"length"``);
    the finishing piece carries ``tokens``, the number of tokens generated."""

    text: str
    finish_reason: str | None = None
    tokens: int = 0


class LocalEngine:
    """Generation on one ``Transformer`` in this process (see module docstring).

    Args:
        model: the model (eval mode is set).
        tokenizer: a ``tokenizers.Tokenizer``.
        model_name: the id ``/v1/models`` reports.
        context: the serving context length (default: the model's ``max_position_embeddings``).
        eos_token: the end-of-text token (generation stops there).
    """

    def __init__(self, model, tokenizer, model_name: str, *, context: int | None = None,
                 eos_token: str = "<|endoftext|>", chat_template: str = DEFAULT_CHAT_TEMPLATE):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context = context or model.args.max_position_embeddings
        self.vocab_size = model.args.vocab_size
        self.eos_id = tokenizer.token_to_id(eos_token)
        self.chat_template = chat_template
        self.live: dict[int, object] = {}  # id -> decode state of sequences being generated
        self.completed = 0
        self._next_id = 0

    def stats(self) -> dict:
        """``live_sequences``, ``decode_state_bytes`` (their decode states), ``completed`` (finished or dropped)."""
        live = list(self.live.values())
        return {"live_sequences": len(live), "decode_state_bytes": sum(st.nbytes() for st in live),
                "completed": self.completed}

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

        The sequence's decode state lives in ``self.live`` until the generator finishes or is
        closed (a client that disconnects closes it), so it is freed either way. Past
        ``deadline`` (``time.monotonic()`` seconds) generation stops with ``finish_reason``
        ``"timeout"``.
        """
        sid = self._next_id
        self._next_id += 1
        try:
            yield from self._generate(sid, prompt_ids, req, deadline)
        finally:
            self.live.pop(sid, None)
            self.completed += 1

    @torch.no_grad()
    def _generate(self, sid: int, prompt_ids: list[int], req, deadline: float | None) -> Iterator[Delta]:
        import time

        m = self.model
        bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
        sampler = Sampler(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed,
                          logit_bias=bias, vocab_size=self.vocab_size)
        stop = StopChecker(req.stops(), req.stop_token_ids)
        limit = min(req.max_tokens or self.context, self.context - len(prompt_ids))
        state = m.new_state(1)
        self.live[sid] = state
        logits = m.prefill(torch.tensor([prompt_ids]), state)[0]
        ids: list[int] = []
        sent = 0
        for _ in range(limit):
            if deadline is not None and time.monotonic() > deadline:
                yield Delta(self.tokenizer.decode(ids)[sent:], "timeout", len(ids))
                return
            tok = sampler.sample(logits)
            ids.append(tok)
            if tok == self.eos_id:
                yield Delta("", "stop", len(ids))
                return
            text = self.tokenizer.decode(ids)
            done, upto, reason = stop.check(tok, text)
            while upto > sent and text[upto - 1] == "\ufffd":  # a character still missing bytes
                upto -= 1
            if upto > sent:
                yield Delta(text[sent:upto])
                sent = upto
            if done:
                yield Delta("", reason, len(ids))
                return
            logits = m(torch.tensor([[tok]]), state)[0, -1]
        text = self.tokenizer.decode(ids)
        yield Delta(text[sent:], "length", len(ids))
