"""Continuous batching: every sequence in flight is decoded in one forward pass per step.

One worker thread owns the model and one KV cache (kvcache.py) whose rows are the live sequences, left-padded
so every row's newest token sits in the last column. New requests are prefilled together and
joined to the batch between steps; finished or cancelled rows leave it at once; columns that are
padding in every row are trimmed. Each sequence samples with its own RNG and processors
(sampling.py), so requests with different settings share a batch.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmkit.generation import find_stop, held_back
from llmkit.serve.kvcache import new_cache
from llmkit.serve.sampling import Sampler, SamplingParams, pick_batch
from llmkit.serve.threads import ThreadTuner, for_engine
from llmkit.special import bos_id

if TYPE_CHECKING:
    import torch

    from llmkit.models import LoadedModel


@dataclass
class TokenInfo:
    """One token of a choice's text, with what `logprobs` reports about it."""

    id: int
    text: str
    start: int  # offset of its text in the choice's text (completion, or prompt for echoed tokens)
    logprob: float | None = None
    top: dict[str, float] | None = None


@dataclass
class Chunk:
    """What a sequence delivers: new text and its tokens, and on the last chunk why it ended."""

    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length
    stop_reason: str | None = None  # the stop string matched; None for end-of-text or length
    error: BaseException | None = None
    echo: bool = False  # the prompt, echoed


class Failed(Exception):
    """A sequence's failure as another process reports it: the kind of error and its message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(kind, message)
        self.kind, self.message = kind, message

    def __str__(self) -> str:
        return self.message


def describe(error: BaseException) -> str:
    """`Kind: message`, for the 500 a failed sequence answers with."""
    kind = error.kind if isinstance(error, Failed) else type(error).__name__
    return f"{kind}: {error}"


class IncrementalText:
    """A sequence's text, decoded a few tokens at a time instead of from the start at every token.

    The way TGI and vLLM do it: decode from a recent token (so a tokenizer that drops a leading space
    at the start of a decode still gets it right) and keep what came after the part decoded before.
    A token that ends inside a character (bytes of UTF-8 still to come) leaves the boundary where it
    was, so the text always equals decoding every token from the start.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.stable = ""  # text of ids[:read], final
        self.prefix = 0  # decoding starts here...
        self.read = 0  # ...and the text of ids[prefix:read] is already in `stable`
        self.prefix_text = ""
        self.value = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        window = self.decode(self.ids[self.prefix :])
        self.value = self.stable + window[len(self.prefix_text) :]
        if not window.endswith("\ufffd"):
            self.stable = self.value
            self.prefix, self.read = self.read, len(self.ids)
            self.prefix_text = self.decode(self.ids[self.prefix : self.read])
        return self.value

    def checked_upto(self, longest_stop: int) -> int:
        """Where a stop string may begin that was not already looked for at the token before."""
        return max(0, len(self.stable) - longest_stop)


class Sequence:
    """One choice being generated: its tokens, text, stop strings and delivery."""

    def __init__(
        self,
        engine: Engine,
        prompt_ids: list[int],
        params: SamplingParams,
        seed: int,
        deliver: Callable[[Chunk], None],
        prompt_text: str | None = None,
    ) -> None:
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.prompt_text = prompt_text
        self.params = params
        self.sampler = Sampler(params, engine.eos_ids, seed)
        self.deliver = deliver
        self.generated: list[int] = []
        self.ends: list[int] = []  # text length after each generated token
        self.infos: list[TokenInfo] = []
        self.released = 0  # tokens delivered
        self.emitted = 0  # characters delivered
        self.next_token: int | None = None
        self.finished = False
        self.cancelled = False
        self.text = IncrementalText(engine.decode)
        self.longest_stop = max((len(stop) for stop in params.stop), default=0)

    # -- called by the worker ------------------------------------------------------------------------
    def begin(self, prompt_logits: torch.Tensor | None) -> None:
        """Deliver the echoed prompt (with its tokens' logprobs when asked)."""
        if not self.params.echo:
            return
        text = self.prompt_text if self.prompt_text is not None else self.engine.decode(self.prompt_ids)
        tokens: list[TokenInfo] = []
        if self.params.logprobs is not None:
            import torch

            # A BOS llmkit put before a text prompt is context, not text: it is not echoed, and the
            # text's first token is scored given it.
            lead = 1 if self.prompt_text is not None and self.engine.bos is not None else 0
            prompt, starts = IncrementalText(self.engine.decode), []
            for token in self.prompt_ids[lead:]:  # where each token's text begins
                starts.append(len(prompt.value))
                prompt.add(token)
            logprobs = torch.log_softmax(prompt_logits, dim=-1) if prompt_logits is not None else None
            for i, token in enumerate(self.prompt_ids):
                if i < lead:
                    continue
                info = TokenInfo(token, self.engine.token_text(token), starts[i - lead])
                if i > 0 and logprobs is not None:  # the first token has no context to be scored in
                    info.logprob, info.top = self._report(logprobs[i - 1], token)
                tokens.append(info)
        self.deliver(Chunk(text, tokens, echo=True))

    def accept(self, token: int, logits: torch.Tensor) -> None:
        """Take the sampled next token (this row's raw logits [vocab] for logprobs); deliver what is final."""
        if self.finished:
            return
        self.next_token = token
        if token in self.engine.eos_ids:
            self._finish("stop", None, self.ends[-1] if self.ends else 0)
            return
        info = TokenInfo(token, self.engine.token_text(token), self.ends[-1] if self.ends else 0)
        if self.params.logprobs is not None:
            import torch

            info.logprob, info.top = self._report(torch.log_softmax(logits, dim=-1), token)
        self.generated.append(token)
        self.engine.tokens_generated += 1
        self.infos.append(info)
        start = self.text.checked_upto(self.longest_stop)
        text = self.text.add(token)
        self.ends.append(len(text))
        hit = find_stop(text, self.params.stop, start)
        if hit is not None:
            self._finish("stop", text[hit[0] : hit[1]], hit[0], text)
        elif len(self.generated) >= self.params.max_tokens:
            self._finish("length", None, len(text), text)
        else:
            self._release(text, len(text) - held_back(text, self.params.stop))

    def context(self) -> torch.Tensor:
        """The ids so far [1, n], for penalties over the sequence's history."""
        import torch

        return torch.tensor([self.prompt_ids + self.generated])

    def fail(self, error: BaseException) -> None:
        if not self.finished:
            self.finished = True
            self.deliver(Chunk(error=error))

    @contextmanager
    def alone(self) -> Iterator[None]:
        """What fails in this sequence's own work (sampling, processors, stops, text) ends it alone.

        The batch's other rows go on as if it had finished; only the shared forward pass may fail
        them all.
        """
        try:
            yield
        except Exception as exc:
            self.fail(exc)

    def finish_empty(self) -> None:
        """max_tokens 0: only the prompt (echo, scoring) was asked for."""
        self._finish("length", None, 0)

    # -- inside --------------------------------------------------------------------------------------
    def _report(self, logprobs: torch.Tensor, token: int) -> tuple[float, dict[str, float] | None]:
        chosen = float(logprobs[token])
        k = self.params.logprobs or 0
        if not k:
            return chosen, None
        values, ids = logprobs.topk(k)
        top = {self.engine.token_text(int(i)): float(v) for v, i in zip(values, ids, strict=True)}
        top.setdefault(self.engine.token_text(token), chosen)  # OpenAI lists the chosen token too
        return chosen, top

    def _release(self, text: str, upto: int) -> None:
        count = self.released
        while count < len(self.ends) and self.ends[count] <= upto:
            count += 1
        if upto > self.emitted or count > self.released:
            self.deliver(Chunk(text[self.emitted : upto], self.infos[self.released : count]))
            self.emitted, self.released = max(self.emitted, upto), count

    def _finish(self, reason: str, stop: str | None, end: int, text: str | None = None) -> None:
        self.finished = True
        if text is None:
            text = self.text.value
        # Tokens that begin before the cut belong to the choice; the stop string itself does not.
        count = self.released
        while count < len(self.infos) and self.infos[count].start < end:
            count += 1
        self.infos = self.infos[:count]
        chunk = Chunk(text[self.emitted : end], self.infos[self.released :], reason, stop)
        self.emitted, self.released = end, count
        self.deliver(chunk)

    @property
    def completion_tokens(self) -> int:
        return len(self.generated)


class Engine:
    """Owns the model on one worker thread; `submit` and `cancel` are safe from any thread."""

    def __init__(self, lm: LoadedModel, max_batch: int = 16, tuner: ThreadTuner | None = None) -> None:
        import torch

        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.device = lm.device
        self.context = lm.context
        self.max_batch = max_batch
        from llmkit.products import one_row_head, weight_left

        # Decoding steps multiply a few rows by every weight: put the weight on the left where the
        # CPU's BLAS is faster so, and give one row (a lone sequence) the head's transposed copy
        # (products.py). The model belongs to the engine from here on: it is never trained again.
        one_row_head(lm.model, lm.device)
        self.weight_left_layers = weight_left(lm.model, lm.device)
        from llmkit import attention

        # A half-precision model's attention runs in float32 over a float32 cache where that is
        # faster (attention.py); None: the cache keeps the model's precision.
        self.kv_dtype = attention.use(lm.model, lm.device)
        # The batch's cache has room for every row the batch may hold, so joining rows write only
        # themselves (kvcache.py); on the CPU untouched room costs no memory, on a GPU it would.
        self._rows_room = max_batch if lm.device.type == "cpu" else 1
        eos = lm.model.generation_config.eos_token_id
        if eos is None:
            eos = lm.tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
        self.pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        self.bos = bos_id(lm.tokenizer)  # put before text prompts, as the tokenizer itself would
        self._token_texts: dict[int, str] = {}
        self._cond = threading.Condition()
        self._pending: deque[Sequence] = deque()
        self._rows: list[Sequence] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llmkit-engine", daemon=True)
        self.steps = 0
        self.tokens_generated = 0
        self.tuner = tuner or for_engine(torch.get_num_threads())
        self._threads = 0  # the worker thread sets its own count on its first step
        # Test hook: seconds to sleep per decoding step, so tests can act while a request is in flight.
        self._step_delay = float(os.environ.get("LLMKIT_TEST_STEP_DELAY", "0") or 0)
        # Called on the worker after every step (process.py sends the step's chunks on from there).
        self.after_step: Callable[[], None] | None = None

    def stats(self) -> dict[str, Any]:
        """For /health: sequences decoding and waiting, decoding steps and tokens so far, and the
        thread count chosen for each batch size measured so far."""
        return {
            "running": len(self._rows),
            "waiting": len(self._pending),
            "steps": self.steps,
            "tokens_generated": self.tokens_generated,
            "threads": self.tuner.choices(),
        }

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what is in flight (within `timeout`), then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def sequence(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        deliver: Callable[[Chunk], None],
        seed: int | None = None,
        prompt_text: str | None = None,
    ) -> Sequence:
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little") >> 1
        return Sequence(self, prompt_ids, params, seed, deliver, prompt_text)

    def submit(self, sequences: list[Sequence]) -> None:
        with self._cond:
            self._pending.extend(sequences)
            self._cond.notify_all()

    def cancel(self, sequences: list[Sequence]) -> None:
        with self._cond:
            for seq in sequences:
                seq.cancelled = True
            self._cond.notify_all()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_text(self, token: int) -> str:
        """One token's own text, decoded once per server (every row reports it with every token)."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.decode([token])
        return text

    # -- the worker ----------------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        while True:
            with self._cond:
                while not (self._pending or self._rows) and not self._stopping:
                    self._cond.wait()
                if self._stopping and not (self._pending or self._rows):
                    return
                new = [
                    self._pending.popleft()
                    for _ in range(min(self.max_batch - len(self._rows), len(self._pending)))
                ]
            try:
                with torch.inference_mode():
                    self._step([s for s in new if not s.cancelled])
            except (
                Exception
            ) as exc:  # out of memory, or anything else: these requests fail, the server goes on
                for seq in self._rows + new:
                    seq.fail(exc)
                self._rows, self._cache, self._mask = [], None, None
            if self.after_step is not None:
                self.after_step()

    def _step(self, new: list[Sequence]) -> None:
        self._drop()
        if new:
            self._use_threads(self.tuner.most)  # a prompt's many columns keep every thread busy
            self._prefill(new)
        if self._rows:
            rows = len(self._rows)
            threads = self.tuner.most if new else self.tuner.choose(rows)
            self._use_threads(threads)
            started = time.perf_counter()
            self._decode()
            if not new:
                self.tuner.record(rows, threads, time.perf_counter() - started)
            self.steps += 1
            if self._step_delay:
                time.sleep(self._step_delay)
        self._drop()

    def _use_threads(self, threads: int) -> None:
        import torch

        if threads != self._threads:
            torch.set_num_threads(threads)
            self._threads = threads

    def _prefill(self, new: list[Sequence]) -> None:
        import torch

        width = max(len(s.prompt_ids) for s in new)
        ids = torch.tensor([[self.pad_id] * (width - len(s.prompt_ids)) + s.prompt_ids for s in new])
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in new])
        scoring = any(s.params.echo and s.params.logprobs is not None for s in new)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(self.device),
            cache=new_cache(store=self.kv_dtype),
            use_cache=True,
            logits_to_keep=0 if scoring else 1,
        )
        logits = out.logits.float()
        for i, seq in enumerate(new):
            n = len(seq.prompt_ids)
            prompt_logits = logits[i, width - n : width - 1] if scoring else None
            with seq.alone():
                seq.begin(prompt_logits)
                if seq.params.max_tokens == 0:
                    seq.finish_empty()
        sampling = [i for i, seq in enumerate(new) if not seq.finished]
        self._sample([new[i] for i in sampling], logits[sampling, -1])
        keep = [i for i in sampling if not new[i].finished]
        if not keep:
            return
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        if len(keep) < len(new):
            cache.batch_select_indices(torch.tensor(keep, device=self.device))
        self._join(cache, mask[keep].to(self.device), [new[i] for i in keep])

    def _join(self, cache: Any, mask: torch.Tensor, rows: list[Sequence]) -> None:
        """Add prefilled rows to the batch: both sides left-padded to the wider one."""
        import torch

        if self._cache is None or self._mask is None:
            self._cache, self._mask, self._rows = cache, mask, rows
            return
        width = max(self._mask.shape[1], mask.shape[1])
        pairs = list(zip(self._cache.layers, cache.layers, strict=True))
        if all(old.can_add(len(rows), mask.shape[1]) for old, _ in pairs):
            for old, add in pairs:
                old.add_rows(add.keys, add.values)  # only the new rows are written (kvcache.py)
        else:  # every row copied into a new cache with room for the batch's rows
            layers = [
                (
                    torch.cat([_pad_left(old.keys, width, 2), _pad_left(add.keys, width, 2)]),
                    torch.cat([_pad_left(old.values, width, 2), _pad_left(add.values, width, 2)]),
                )
                for old, add in pairs
            ]
            self._cache = new_cache(layers, self.kv_dtype, self._rows_room)
        self._mask = torch.cat([_pad_left(self._mask, width), _pad_left(mask, width)])
        self._rows = self._rows + rows

    def _decode(self) -> None:
        import torch

        assert self._mask is not None
        rows = self._rows
        ids = torch.tensor([[s.next_token] for s in rows], device=self.device)
        positions = self._mask.sum(-1, keepdim=True)
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=self._cache, use_cache=True
        )
        self._cache = out.cache if hasattr(out, "cache") else out.past_key_values
        self._mask = mask
        self._sample(rows, out.logits[:, -1].float())

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """Every row's next token in one batched pass (sampling.py); a row that fails ends alone."""
        if not rows:
            return
        samplers = [s.sampler for s in rows]
        tokens = pick_batch(samplers, logits, [s.context for s in rows], [len(s.generated) for s in rows])
        for i, (seq, token) in enumerate(zip(rows, tokens, strict=True)):
            with seq.alone():
                if isinstance(token, Exception):
                    raise token
                seq.accept(token, logits[i])

    def _drop(self) -> None:
        """Finished and cancelled rows leave the batch; all-padding columns go with them."""
        import torch

        if not self._rows:
            return
        keep = [i for i, s in enumerate(self._rows) if not (s.finished or s.cancelled)]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        if len(keep) < len(self._rows):
            assert self._mask is not None
            self._cache.batch_select_indices(torch.tensor(keep, device=self.device))
            self._mask = self._mask[keep]
            self._rows = [self._rows[i] for i in keep]
        assert self._mask is not None
        first = int((self._mask.sum(0) > 0).nonzero()[0])
        if first:
            for layer in self._cache.layers:
                layer.trim(first)
            self._mask = self._mask[:, first:]


def _pad_left(t: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    """`t` with zeros before it along `dim` up to `width` (a mask's columns, a cache's positions)."""
    import torch

    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
