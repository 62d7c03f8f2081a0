"""Token sampling for serving: greedy, temperature, top-k, top-p, logit bias, seeds, stops.

``Sampler(params, vocab_size)`` holds one request's sampling state; ``sample(logits
[V]) -> int`` draws its next token. Order of operations (as vLLM / OpenAI):
logit bias is added, then ``temperature == 0`` takes the argmax; otherwise logits
are divided by the temperature, cut to the ``top_k`` largest, then to the
smallest set whose probability reaches ``top_p``, and sampled. A request ``seed``
seeds its own ``torch.Generator``, so the same request gives the same tokens
whatever else is in the batch. ``StopChecker`` finds stop token ids and stop
strings in the decoded text (holding back text that could be the start of a stop
string while streaming).
"""

from __future__ import annotations

import torch


class Sampler:
    """Sampling state of one sequence.

    Args:
        temperature: 0 = greedy (argmax); else in (0, 2].
        top_k: keep the k most likely tokens (-1: all).
        top_p: nucleus mass in (0, 1].
        seed: seeds this sequence's generator (None: nondeterministic).
        logit_bias: ``{token_id: bias}`` added to the logits (-100 bans, +100 forces in practice).
        vocab_size: V (logits may be padded beyond it: the padding is never sampled).
    """

    def __init__(self, *, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0, seed: int | None = None,
                 logit_bias: dict[int, float] | None = None, vocab_size: int):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.vocab_size = vocab_size
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self.bias = None
        if logit_bias:
            self.bias = torch.zeros(vocab_size)
            for tok, b in logit_bias.items():
                self.bias[int(tok)] = float(b)

    def sample(self, logits_V: torch.Tensor) -> int:
        """The next token id for ``logits [V']`` (float; V' >= vocab_size)."""
        x = logits_V[: self.vocab_size].float()
        if self.bias is not None:
            x = x + self.bias
        if self.temperature == 0:
            return int(torch.argmax(x))
        x = x / self.temperature
        if 0 < self.top_k < x.numel():
            kth = torch.topk(x, self.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if self.top_p < 1.0:
            p_sorted, idx = torch.sort(probs, descending=True)
            before = torch.cumsum(p_sorted, 0) - p_sorted  # mass of the strictly more likely tokens
            p_sorted = p_sorted.masked_fill(before >= self.top_p, 0.0)  # the top token always stays
            probs = torch.zeros_like(probs).scatter_(0, idx, p_sorted)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class StopChecker:
    """Stop conditions of one sequence: stop token ids and stop strings.

    ``check(token_id, text) -> (done, emit_upto, reason)``: ``text`` is the decoded
    completion so far (including this token). ``emit_upto`` is how many characters
    are safe to send now (a stop string's prefix at the end is held back; a matched
    stop string is cut off). ``reason`` is ``"stop"`` when a stop condition matched.
    """

    def __init__(self, stop: list[str] | None = None, stop_token_ids: list[int] | None = None):
        self.stop = [s for s in (stop or []) if s]
        self.stop_ids = set(stop_token_ids or [])

    def check(self, token_id: int, text: str) -> tuple[bool, int, str | None]:
        if token_id in self.stop_ids:
            return True, len(text), "stop"
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            return True, cut, "stop"
        hold = 0
        for s in self.stop:  # longest suffix of text that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return False, len(text) - hold, None
