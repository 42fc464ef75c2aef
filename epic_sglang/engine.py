"""The in-process PIC engine: compile documents once, link them behind any prefix, decode.

    from epic_sglang import Engine
    engine = Engine(model="smollm2-135m")
    out = engine.generate("Who wrote it?", documents=[doc_a, doc_b], policy="legolink-16")
    out.text, out.stats.reused_tokens, out.stats.ttft_s
"""
from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from epic_sglang.attention import TorchReferenceAttention, make_attention
from epic_sglang.constrained import Grammar, GrammarBackend
from epic_sglang.cuda_graph import ScoutGraphs
from epic_sglang.errors import InvalidRequest
from epic_sglang.forward_batch import ForwardBatch
from epic_sglang.kv_pool import KVPool, PoolExhausted, ReqToTokenPool, SlotAllocator
from epic_sglang.link_plan import LinkPlan, plan_link, querylink_pick, scout_queries
from epic_sglang.linker import BlendSeq, Linker
from epic_sglang.models.loader import resolve_model_dir
from epic_sglang.models.weights import load_causal_lm
from epic_sglang.policies import CompileRecipe, Policy, Segment, parse_policy
from epic_sglang.prompt import PromptBuilder
from epic_sglang.sampling import SamplingParams, adjust_logits, sample_next
from epic_sglang.scout_attention import ScoutAttention, ScoutSeq, scored_layers
from radix_ext import KVLayout, PICRadixCache, document_key
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import TreeNode

COMPILE_TOKENS_PER_FORWARD = 8192  # bounds activation memory of one compile pass
LOGPROB_ROWS_PER_CHUNK = 1024  # bounds the (rows x vocab) logits of prompt logprobs
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


@dataclass
class Request:
    question: str = ""
    documents: list[str] = field(default_factory=list)
    system: str | None = None
    policy: str = "legolink-16"
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # A pre-tokenized prompt (e.g. from an API's document spans); overrides the three above.
    segments: list[Segment] | None = None
    return_first_logits: bool = False  # keep the logits that chose the first output token
    namespace: str | None = None  # tenant: documents and prefixes are shared only within one
    # SGLang's logprob options: output tokens' logprobs, and the prompt's from logprob_start_len
    # (-1 = none); top_logprobs_num alternatives per position.
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False


@dataclass
class GenerateStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # document tokens whose KV came from the cache
    recomputed_tokens: int = 0  # tokens computed in the link pass (cacheblend: past its check layer)
    compiled_tokens: int = 0  # document tokens compiled for this request (cache misses)
    cached_prefix_tokens: int = 0  # leading tokens whose exact KV came from the prefix tree
    ttft_s: float = 0.0
    compile_s: float = 0.0
    link_s: float = 0.0
    decode_s: float = 0.0


@dataclass
class GenerateResult:
    text: str
    output_ids: list[int]
    prompt_ids: list[int]
    finish_reason: dict
    policy: str
    stats: GenerateStats
    recomputed_positions: list[int]
    first_logits: torch.Tensor | None = None
    # SGLang's shapes: [logprob, token_id, text or None]; top: one list of those per position.
    input_token_logprobs: list[list] | None = None
    output_token_logprobs: list[list] | None = None
    input_top_logprobs: list[list[list]] | None = None
    output_top_logprobs: list[list[list]] | None = None


@dataclass
class RunningRequest:
    """A request between admission and release: its plan, its row and what it holds."""
    request: Request
    policy: Policy
    segments: list[Segment]
    plan: LinkPlan
    prompt_ids: torch.Tensor
    stats: GenerateStats
    documents: list[TreeNode] = field(default_factory=list)  # locked, one per doc span
    prefix_node: TreeNode | None = None  # locked end of the matched exact prefix
    prefix_slots: torch.Tensor | None = None  # its slots: the tokens reused from the prefix tree
    row: int | None = None
    linked: bool = False  # the row holds computed KV (publishable)
    private: list[torch.Tensor] = field(default_factory=list)
    pick_slots: torch.Tensor | None = None  # querylink: private slots reserved for its picks
    seq_len: int = 0
    output_ids: list[int] = field(default_factory=list)
    recomputed_positions: list[int] = field(default_factory=list)
    finish_reason: dict | None = None
    error: str | None = None  # this request failed on its own (sampling, grammar, logprobs); others go on
    text: str = ""
    generator: torch.Generator | None = None
    grammar: Grammar | None = None
    first_logits: torch.Tensor | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    logits_from: int = 0  # first position whose logits the link keeps (prompt logprobs)
    input_logprobs: list[list] = field(default_factory=list)
    input_top: list[list[list]] = field(default_factory=list)
    output_logprobs: list[list] = field(default_factory=list)
    output_top: list[list[list]] = field(default_factory=list)

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix_slots is None else len(self.prefix_slots)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Engine:
    def __init__(self, model: str = "smollm2-135m", device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, kv_cache_gb: float = 2.0, max_requests: int = 64,
                 max_context_len: int | None = None, attention: str = "auto", link_mode: str = "auto",
                 load_format: str = "auto", kv_dir: str | Path | None = None, host_cache_gb: float = 0.0,
                 eviction_policy: str = "lru", cuda_graphs: bool = True):
        """`attention`: auto | torch | flashinfer; `link_mode` (flashinfer): auto | gathered | cascade | fused | mask;
        `load_format`: auto | dummy (random weights at the model's shape, for speed runs);
        `kv_dir`: disk tier for compiled documents (survives restarts); `host_cache_gb`:
        host-memory tier for documents evicted from the pool; `eviction_policy`: SGLang's
        (lru, lfu, fifo, ...); `cuda_graphs`: replay decode steps (GPU, FlashInfer with
        fused RoPE) and querylink's scout from CUDA graphs."""
        from transformers import AutoTokenizer

        self.device = torch.device(device) if device is not None else _default_device()
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else torch.bfloat16)
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormals make fp32 CPU decode ~10x slower
        self.model_dir = resolve_model_dir(model)
        self.model_name = model
        self.load_format = load_format
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {load_format!r}")
        self.model = load_causal_lm(self.model_dir, self.dtype, self.device, dummy=load_format == "dummy")
        self.config = self.model.config
        # BPE tokenizers ignore the cleanup anyway; saying so silences transformers' warning.
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, clean_up_tokenization_spaces=False)
        self.prompts = PromptBuilder(self.tokenizer)
        self.fingerprint = self._fingerprint()
        self.eos_token_ids = self._eos_token_ids()
        self.max_context_len = min(max_context_len or self.config.max_position_embeddings,
                                   self.config.max_position_embeddings)

        cfg = self.config
        token_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize
        size = max(4096, int(kv_cache_gb * (1 << 30)) // token_bytes)
        self.pool = KVPool(size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device)
        self.allocator = SlotAllocator(size, self.device)
        self.req_to_token_pool = ReqToTokenPool(max_requests, self.max_context_len + 1, self.device)
        layout = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.dtype)
        self.cache = PICRadixCache(
            CacheInitParams(disable=False, req_to_token_pool=self.req_to_token_pool,
                            token_to_kv_pool_allocator=self.allocator, page_size=1, eviction_policy=eviction_policy),
            self.pool, layout, self.fingerprint, host_cache_bytes=int(host_cache_gb * (1 << 30)), disk_dir=kv_dir)
        self.grammars = GrammarBackend(self.tokenizer, cfg.vocab_size, self.eos_token_ids)
        self.attention = make_attention(attention, cfg, self.device, self.dtype, link_mode)
        self.linker = Linker(self.model, self.pool, self.attention)
        self.decode_graphs = None
        self.cuda_graphs = cuda_graphs
        self._scout_graph_set: ScoutGraphs | None = None
        if cuda_graphs and self.device.type == "cuda" and getattr(self.attention, "can_fuse", False):
            from epic_sglang.cuda_graph import DecodeGraphs

            graph_batch = min(max_requests, 64)
            # a step reads each request's whole row: shared documents once per request that links
            # them, so a step's keys are bounded by the rows, not by the pool (which they exceed)
            self.decode_graphs = DecodeGraphs(self.model, self.pool, self.attention, graph_batch,
                                              graph_batch * (self.max_context_len + 1))

    # ----------------------------------------------------------------- public API
    def generate(self, question: str, documents: list[str] | None = None, system: str | None = None,
                 policy: str = "legolink-16", max_new_tokens: int = 32, temperature: float = 0.0,
                 **sampling) -> GenerateResult:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, **sampling)
        return self.generate_batch([Request(question, list(documents or []), system, policy, params)])[0]

    def generate_batch(self, requests: list[Request]) -> list[GenerateResult]:
        """Runs the requests together: one compile pass for their missing documents, one link
        pass, then batched decode steps until each finishes."""
        states = [self.admit(r) for r in requests]
        try:
            self.prefill(states)
            self.step(states, [])
            active = [s for s in states if not s.finished]
            while active:
                self.step([], active)
                active = [s for s in active if not s.finished]
            return [self.finish(s) for s in states]
        finally:
            for s in states:
                self._release(s)

    # ----------------------------------------------------------------- step-level API (the scheduler's)
    def admit(self, req: Request) -> RunningRequest:
        """Validate and plan one request (tokens, policy, grammar); holds no memory yet.
        Raises InvalidRequest (a ValueError) with a message for the client."""
        policy = parse_policy(req.policy)
        req.sampling.validate()
        segments = req.segments if req.segments is not None else self.prompts.build(req.question, req.documents, req.system)
        self._check_segments(segments)
        plan = plan_link(policy, segments)
        n = plan.num_tokens
        if n + req.sampling.max_new_tokens > self.max_context_len:
            raise InvalidRequest(f"prompt of {n} tokens + max_new_tokens {req.sampling.max_new_tokens} exceeds "
                             f"the model's context of {self.max_context_len} tokens; drop documents or lower max_new_tokens")
        prompt_ids = torch.tensor([t for s in segments for t in s.token_ids], dtype=torch.int64, device=self.device)
        s = RunningRequest(req, policy, segments, plan, prompt_ids, GenerateStats(prompt_tokens=n),
                           generator=req.sampling.generator(),
                           grammar=self.grammars.grammar(req.sampling.regex, req.sampling.json_schema))
        s.logits_from = self._logits_from(s)
        return s

    def prefill(self, states: list[RunningRequest]) -> None:
        """Give admitted requests their KV rows: exact prefix from the tree, documents from
        any tier (misses compiled in one pass), private slots for what the link recomputes.
        On PoolExhausted nothing stays held."""
        t0 = time.perf_counter()
        try:
            for s in states:
                self._match_prefix(s)
            self._compile_for(states)
            for s in states:
                self._assemble_row(s)
        except PoolExhausted:
            for s in states:
                self._release(s)
            raise
        for s in states:
            s.stats.compile_s = time.perf_counter() - t0

    @torch.inference_mode()
    def step(self, linking: list[RunningRequest], decoding: list[RunningRequest]) -> None:
        """One forward: the link pass of newly prefilled requests and one decode token of
        running ones, batched together (cacheblend links run their own selective pass).
        Raises PoolExhausted before changing anything if the decode tokens find no slots."""
        t0 = time.perf_counter()
        slots = self._alloc(len(decoding)) if decoding else None
        if not linking and self.decode_graphs is not None and len(decoding) <= self.decode_graphs.max_batch:
            return self._decode_graphed(decoding, slots)
        plain = [s for s in linking if s.plan.blend_ratio == 0]
        blend = [s for s in linking if s.plan.blend_ratio > 0]
        self._scout([s for s in plain if s.plan.pick_budget > 0])
        parts = [self._link_part(s) for s in plain]
        for s, slot in zip(decoding, slots if slots is not None else []):
            parts.append(self._decode_part(s, slot))
        if parts:
            batch = ForwardBatch.build(parts)
            counts = [s.plan.num_tokens - s.logits_from for s in plain] + [1] * len(decoding)
            index = torch.cat([torch.arange(v.q_end - c, v.q_end) for v, c in zip(batch.seqs, counts)]).to(self.device)
            hidden = self.linker.run(batch, index).split(counts)
            for s, h in zip(plain + decoding, hidden):
                self._accept_alone(s, h)
        if blend:
            seqs = [self._blend_seq(s) for s in blend]
            logits, picked = self.linker.run_cacheblend(seqs)
            for s, p, row in zip(blend, picked, logits):
                s.recomputed_positions = p.tolist()
                self._accept_alone(s, row.unsqueeze(0), hidden=False)
        for s in linking:
            s.linked = True
            s.stats.link_s = time.perf_counter() - t0
            self._count_link(s)

    def finish(self, s: RunningRequest, abort: str | None = None) -> GenerateResult:
        """Release the request (publishing its exact prefix) and return its result."""
        if abort is not None and not s.finished:
            s.finish_reason = {"type": "abort", "message": abort}
        self._release(s)
        return self._result(s)

    def compile(self, documents: list[str], policy: str = "legolink-16", namespace: str | None = None) -> int:
        """Compile (or find, on any tier) the documents' KV for the policy's recipe, ahead of
        any request. Returns the number of tokens compiled (0 = all were cached)."""
        return self._precompile([self.prompts.encode_document(d) for d in documents], policy, namespace)

    def compile_segments(self, segments: list[Segment], policy: str = "legolink-16", namespace: str | None = None) -> int:
        """Same, for the document segments of a pre-tokenized prompt."""
        return self._precompile([s.token_ids for s in segments if s.document is not None], policy, namespace)

    def document_key(self, token_ids: tuple[int, ...], policy: str = "legolink-16", namespace: str | None = None) -> str:
        """The DocKey a document's tokens are cached under for this model and policy."""
        return document_key(self.fingerprint, parse_policy(policy).recipe.name, namespace, token_ids)

    def _precompile(self, token_seqs: list[tuple[int, ...]], policy: str, namespace: str | None) -> int:
        docs, compiled = self._compile(token_seqs, parse_policy(policy).recipe, namespace)
        for d in docs:
            self.cache.dec_lock_ref(d)
        return compiled

    def kv_usage(self) -> dict[str, int]:
        """Pool slots: free, held by the cache (of which locked by running requests), held
        privately by requests; free + cached + private == total always."""
        free, cached = self.allocator.available_size(), self.cache.total_size()
        return {"total": self.allocator.size, "free": free, "cached": cached, "locked": self.cache.protected_size(),
                "private": self.allocator.size - free - cached,
                "request_rows_in_use": len(self.req_to_token_pool.req_to_token) - len(self.req_to_token_pool.free_rows)}

    def close(self) -> None:
        """Finish background work (the disk tier's queued writes); the engine stays usable."""
        self.cache.close()

    def flush_cache(self) -> int:
        """Drop every cached document and prefix not in use from device and host (the disk
        tier stays); returns the number of device tokens freed."""
        return self.cache.flush()

    # ----------------------------------------------------------------- admission
    def _logits_from(self, s: RunningRequest) -> int:
        """First position whose logits the link must produce: the last one, or one before
        logprob_start_len when the prompt's logprobs are asked for (those positions are then
        recomputed exactly and never taken from a cache)."""
        n, req = s.plan.num_tokens, s.request
        if not req.return_logprob or req.logprob_start_len < 0 or req.logprob_start_len >= n:
            return n - 1
        if s.plan.blend_ratio > 0:
            raise InvalidRequest("prompt logprobs (logprob_start_len) are not available with cacheblend policies")
        start = max(req.logprob_start_len - 1, 0)
        s.plan.recompute[start:] = True
        return start

    def _check_segments(self, segments: list[Segment]) -> None:
        if not segments or not any(len(s) for s in segments):
            raise InvalidRequest("empty prompt: give at least one token")
        vocab = self.config.vocab_size
        for seg in segments:
            if seg.document is not None and not len(seg):
                raise InvalidRequest("empty document: every document needs some tokens")
            if any(not 0 <= t < vocab for t in seg.token_ids):
                raise InvalidRequest(f"token id out of range [0, {vocab})")

    # ----------------------------------------------------------------- compile
    def _compile_for(self, states: list[RunningRequest]) -> None:
        for s in states:
            if not s.plan.doc_spans:
                continue
            s.documents, s.stats.compiled_tokens = self._compile(
                [s.segments[i].token_ids for _, _, i in s.plan.doc_spans], s.policy.recipe, s.request.namespace)

    def _compile(self, token_seqs: list[tuple[int, ...]], recipe: CompileRecipe,
                 namespace: str | None) -> tuple[list[TreeNode], int]:
        """Returns the documents' nodes, compiling misses (each alone at position 0), and the
        number of tokens compiled. Each returned node is locked once per occurrence: the
        caller unlocks them."""
        keys = [document_key(self.fingerprint, recipe.name, namespace, ids) for ids in token_seqs]
        held: dict[str, TreeNode] = {}  # locked while later misses allocate
        missing: dict[str, tuple[int, ...]] = {}
        for key, ids in zip(keys, token_seqs):
            if key in held or key in missing:
                continue
            node = self.cache.match_document(key, ids)
            if node is None:
                missing[key] = ids
            else:
                self.cache.inc_lock_ref(node)
                held[key] = node
        sink = self.prompts.sink_tokens(recipe.sink_tokens)
        batch: list[tuple[str, tuple[int, ...]]] = []
        for key, ids in missing.items():
            if batch and sum(len(b) + len(sink) for _, b in batch) + len(ids) > COMPILE_TOKENS_PER_FORWARD:
                held.update(self._compile_batch(batch, sink, recipe, namespace))
                batch = []
            batch.append((key, ids))
        if batch:
            held.update(self._compile_batch(batch, sink, recipe, namespace))
        docs = [held[k] for k in keys]
        for d in docs:
            self.cache.inc_lock_ref(d)
        for d in held.values():
            self.cache.dec_lock_ref(d)
        return docs, sum(len(ids) for ids in missing.values())

    def _compile_batch(self, docs: list[tuple[str, tuple[int, ...]]], sink: list[int], recipe: CompileRecipe,
                       namespace: str | None) -> dict[str, TreeNode]:
        """Prefill the documents (each its own sequence) and cache their KV, locked."""
        parts, owned = [], []
        for _, ids in docs:
            tokens = torch.tensor(sink + list(ids), dtype=torch.int64, device=self.device)
            slots = self._alloc(tokens.numel())
            parts.append((tokens, torch.arange(tokens.numel(), device=self.device), slots, slots))
            owned.append(slots)
        self.linker.run(ForwardBatch.build(parts))
        out = {}
        for (key, ids), slots in zip(docs, owned):
            self.allocator.free(slots[:len(sink)])  # the sinks' KV is thrown away
            out[key] = self.cache.insert_document(key, ids, slots[len(sink):], namespace=namespace, recipe=recipe.name)
            self.cache.inc_lock_ref(out[key])
        return out

    # ----------------------------------------------------------------- exact prefixes
    def _leading_len(self, s: RunningRequest) -> int:
        """Tokens before the first document (all but the last token if there is none): the
        part of the prompt that is computed exactly and can be shared as a prefix. CacheBlend
        rows are all private (its first layers recompute every token), so it opts out."""
        if s.plan.blend_ratio > 0:
            return 0
        lead = 0
        for seg in s.segments:
            if seg.document is not None:
                return lead
            lead += len(seg)
        return lead - 1

    def _match_prefix(self, s: RunningRequest) -> None:
        lead = min(self._leading_len(s), s.logits_from)
        if lead <= 0:
            return
        slots, node = self.cache.match_exact_prefix(s.prompt_ids[:lead].tolist(), s.request.namespace)
        self.cache.inc_lock_ref(node)
        s.prefix_node, s.prefix_slots = node, slots
        s.plan.recompute[:s.prefix_len] = False
        s.stats.cached_prefix_tokens = s.prefix_len

    def _publish_prefix(self, s: RunningRequest, private: torch.Tensor) -> torch.Tensor:
        """Give the request's exactly computed leading KV to the prefix tree; returns the
        private slots the request still owns."""
        lead = self._leading_len(s)
        if not s.linked or lead <= s.prefix_len:
            return private
        row = self.req_to_token_pool.req_to_token[s.row, :lead]
        cached = self.cache.publish_exact_prefix(s.prompt_ids[:lead].tolist(), row, s.request.namespace)
        return private[~torch.isin(private, row[cached:])]  # the tree owns those now

    # ----------------------------------------------------------------- link
    def _assemble_row(self, s: RunningRequest) -> None:
        """Fill the request's req_to_token row: cached document slots where KV is reused,
        fresh private slots where the plan recomputes (cacheblend: private everywhere).
        Indices are worked out on the host and sent once: a boolean index on the device
        would stop the host on the stream twice per document."""
        n = s.plan.num_tokens
        row = self.req_to_token_pool.alloc()
        if row is None:
            raise PoolExhausted(f"more than {len(self.req_to_token_pool.req_to_token)} requests at once")
        s.row = row
        blend = s.plan.blend_ratio > 0
        fresh = torch.ones(n, dtype=torch.bool) if blend else s.plan.recompute
        slots = torch.zeros(n, dtype=torch.int64, device=self.device)
        fresh_at = fresh.nonzero().flatten()
        private = self._alloc(fresh_at.numel() + s.plan.pick_budget)  # querylink's picks: taken now
        s.private.append(private)
        slots[fresh_at.to(self.device)] = private[:fresh_at.numel()]
        s.pick_slots = private[fresh_at.numel():]
        if not blend:
            if s.prefix_len:
                slots[:s.prefix_len] = s.prefix_slots
            if s.documents:
                # reused position p of a document starting at `start` takes its slot `p - start`,
                # found at `offset + p - start` in all documents' slots laid end to end
                at, offset, take = [], 0, []
                for (start, length, _), doc in zip(s.plan.doc_spans, s.documents):
                    reused = (~s.plan.recompute[start:start + length]).nonzero().flatten()
                    at.append(start + reused)
                    take.append(offset + reused)
                    offset += length
                doc_slots = torch.cat([doc.value for doc in s.documents])
                slots[torch.cat(at).to(self.device)] = doc_slots[torch.cat(take).to(self.device)]
        self.req_to_token_pool.req_to_token[row, :n] = slots
        s.seq_len = n

    def _link_part(self, s: RunningRequest) -> tuple:
        computed = s.plan.recompute.nonzero().flatten()
        s.recomputed_positions = computed.tolist()  # from the host copy: no wait on the device
        computed = computed.to(self.device)
        row = self.req_to_token_pool.req_to_token[s.row, :s.seq_len]
        return s.prompt_ids[computed], computed, row[computed], row

    def scout_mass(self, states: list[RunningRequest]) -> list[torch.Tensor]:
        """querylink's scout for prefilled requests: the prompt's non-document tokens (the
        question) through the layers over the documents' cached KV (naive's link, in the
        private slots the link overwrites). Returns per request the (n,) attention mass its
        question (the tokens after its last document; the last token if none) puts on each
        prompt position, summed over the policy's scored layers (`scout_attention`). On CUDA a
        request replays its scout from a CUDA graph when one fits it (`cuda_graph.ScoutGraphs`:
        eagerly, 64 question tokens over 32 layers are ~40 ms of host work); the others scout
        together per stride."""
        out: list[torch.Tensor | None] = [None] * len(states)
        eager: dict[int, list[tuple[int, tuple, list[int], list[bool]]]] = {}
        # beside the torch reference backend, the torch definition (no kernels, no graphs)
        reference = self.device.type != "cuda" or isinstance(self.linker.attn, TorchReferenceAttention)
        graphs = None if reference else self._scout_graphs()
        for i, s in enumerate(states):
            part, positions, scored = self._scout_part(s)
            if graphs is not None and graphs.fits(len(positions), s.seq_len):
                out[i] = graphs.run(part, positions, scored, s.policy.stride)
            else:
                eager.setdefault(s.policy.stride, []).append((i, part, positions, scored))
        for stride, members in eager.items():
            seqs, start = [], 0
            for _, part, positions, scored in members:
                seqs.append(ScoutSeq.build(start, positions, scored, part[3], self.config.num_kv_heads, self.linker.rotary))
                start += len(positions)
            scout = ScoutAttention(seqs, scored_layers(self.config.num_layers, stride), reference)
            self.linker.run_scout(ForwardBatch.build([part for _, part, _, _ in members]), scout)
            for (i, *_), mass in zip(members, scout.masses()):
                out[i] = mass
        return out

    def _scout_graphs(self) -> ScoutGraphs | None:
        """The scout's CUDA graphs, made at the first querylink request (none on CPU, or
        without `cuda_graphs`)."""
        if not (self.cuda_graphs and self.device.type == "cuda"):
            return None
        if self._scout_graph_set is None:
            self._scout_graph_set = ScoutGraphs(self.linker, self.max_context_len + 1)
        return self._scout_graph_set

    def _scout_part(self, s: RunningRequest) -> tuple[tuple, list[int], list[bool]]:
        """The scout's sequence, and on the host its positions and which of them are scored
        (the question: after the last document; the last token if none): the link's
        non-document tokens, over a row whose document positions all hold the cached KV (the
        link's private slots for its recomputed document tokens hold nothing yet)."""
        docs = s.plan.document_mask()
        recomputed = s.plan.recompute.nonzero().flatten().numpy()
        picked, scored = scout_queries(s.plan, recomputed)
        positions = torch.from_numpy(recomputed[picked])
        scouted = torch.zeros_like(docs)
        scouted[positions] = True  # the last token's slot is private even inside a document
        row = self.req_to_token_pool.req_to_token[s.row, :s.seq_len].clone()
        cached = torch.cat([d.value for d in s.documents])
        keep = (docs & ~scouted)[docs]  # document positions read from the cache
        row[(docs & ~scouted).nonzero().flatten().to(self.device)] = cached[keep.to(self.device)]
        computed = positions.to(self.device)
        return (s.prompt_ids[computed], computed, row[computed], row), positions.tolist(), scored.tolist()

    def _scout(self, states: list[RunningRequest]) -> None:
        """querylink: add the document tokens each question attends to most to its plan, in
        the private slots reserved for them."""
        for s, mass in zip(states, self.scout_mass(states)):
            self._add_picks(s, querylink_pick(mass, s.plan, s.policy.block))

    def _add_picks(self, s: RunningRequest, picks: torch.Tensor) -> None:
        used, unused = s.pick_slots[:picks.numel()], s.pick_slots[picks.numel():]
        self.req_to_token_pool.req_to_token[s.row, picks.to(self.device)] = used
        s.plan.recompute[picks] = True
        s.plan.pick_budget = 0  # spent
        if unused.numel():  # fewer candidates than the budget
            self.allocator.free(unused)
            s.private = [p[~torch.isin(p, unused)] for p in s.private]
        s.pick_slots = None

    def _count_link(self, s: RunningRequest) -> None:
        recomputed = torch.zeros(s.plan.num_tokens, dtype=torch.bool)
        recomputed[s.recomputed_positions] = True
        s.stats.recomputed_tokens = int(recomputed.sum())
        s.stats.reused_tokens = int((s.plan.document_mask() & ~recomputed).sum())

    def _blend_seq(self, s: RunningRequest) -> BlendSeq:
        positions = [torch.arange(st, st + ln) for st, ln, _ in s.plan.doc_spans]
        doc_positions = torch.cat(positions).to(self.device) if positions else torch.zeros(0, dtype=torch.int64, device=self.device)
        doc_slots = torch.cat([d.value for d in s.documents]) if s.documents else doc_positions
        return BlendSeq(s.prompt_ids, self.req_to_token_pool.req_to_token[s.row, :s.seq_len],
                        s.plan.recompute.to(self.device), doc_positions, doc_slots, s.plan.blend_ratio)

    # ----------------------------------------------------------------- decode
    def _grow(self, s: RunningRequest, slot: torch.Tensor) -> torch.Tensor:
        """Append one private slot (the next token's) to the request's row; returns the row."""
        s.private.append(slot.view(1))
        self.req_to_token_pool.req_to_token[s.row, s.seq_len] = slot
        s.seq_len += 1
        return self.req_to_token_pool.req_to_token[s.row, :s.seq_len]

    def _decode_part(self, s: RunningRequest, slot: torch.Tensor) -> tuple:
        row = self._grow(s, slot)
        pos = torch.tensor([s.seq_len - 1], device=self.device)
        ids = torch.tensor([s.output_ids[-1]], device=self.device)
        return ids, pos, slot.view(1), row

    def _decode_graphed(self, decoding: list[RunningRequest], slots: torch.Tensor) -> None:
        rows = [self._grow(s, slot) for s, slot in zip(decoding, slots)]
        ids = torch.tensor([s.output_ids[-1] for s in decoding], device=self.device)
        for s, row in zip(decoding, self.decode_graphs.run(ids, slots, rows)):
            self._accept_alone(s, row.unsqueeze(0), hidden=False)

    def _accept_alone(self, s: RunningRequest, rows: torch.Tensor, hidden: bool = True) -> None:
        """`_accept`, a failure of which fails this request alone (the batch's forward is done)."""
        try:
            self._accept(s, rows, hidden)
        except Exception as e:  # noqa: BLE001 - reported as the request's error
            s.error = f"{type(e).__name__}: {e}"
            s.finish_reason = {"type": "abort", "message": s.error}

    def _accept(self, s: RunningRequest, rows: torch.Tensor, hidden: bool = True) -> None:
        """Take one forward's output for a request: prompt logprobs (link only), then the
        next token (its last row) and whether the request finished."""
        if hidden and len(rows) > 1:
            self._prompt_logprobs(s, rows[:-1])
        last = self.model.logits(rows[-1:])[0] if hidden else rows[-1]
        params = s.request.sampling
        if params.max_new_tokens == 0:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the prefill is done when its KV is
            self._first_token_time(s)
            s.finish_reason = {"type": "length", "length": 0}
            return
        if s.request.return_first_logits and not s.output_ids:
            s.first_logits = last.detach().float().cpu()
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        adjusted = adjust_logits(last, params, s.output_ids, stop_ids)
        if s.grammar is not None:
            adjusted = s.grammar.mask(adjusted)
        token = sample_next(adjusted, params, s.generator)  # int(): waits for the GPU
        self._first_token_time(s)
        if s.request.return_logprob:
            self._record_logprobs(s, last.unsqueeze(0), [token], s.output_logprobs, s.output_top)
        s.output_ids.append(token)
        self._check_finished(s, token, stop_ids)

    @staticmethod
    def _first_token_time(s: RunningRequest) -> None:
        if s.first_token_at is None:
            s.first_token_at = time.perf_counter()
            s.stats.ttft_s = s.first_token_at - s.arrival

    def _check_finished(self, s: RunningRequest, token: int, stop_ids: set[int]) -> None:
        params = s.request.sampling
        if s.grammar is not None and token not in stop_ids:
            s.grammar.accept(token)
        if token in stop_ids:
            s.finish_reason = {"type": "stop", "matched": token}
            s.text = self._detok(s.output_ids[:-1], params)
            return
        s.text = self._detok(s.output_ids, params)
        hits = [(s.text.find(stop), stop) for stop in params.stop if stop in s.text]
        hits += [(m.start(), m.group(0)) for m in (re.search(r, s.text) for r in params.stop_regex) if m]
        if hits:
            cut, stop = min(hits)
            s.text = s.text[:cut + len(stop)] if params.no_stop_trim else s.text[:cut]
            s.finish_reason = {"type": "stop", "matched": stop}
        elif s.grammar is not None and s.grammar.done:
            s.finish_reason = {"type": "stop", "matched": None}
        elif len(s.output_ids) >= params.max_new_tokens:
            s.finish_reason = {"type": "length", "length": len(s.output_ids)}

    def streamable_text(self, s: RunningRequest) -> str:
        """The text so far minus what may still change: a partly decoded character, or a tail
        that could be the start of a stop string (it is cut if the stop completes)."""
        if s.finished:
            return s.text
        text = s.text.rstrip("\ufffd")
        hold = max((k for stop in s.request.sampling.stop for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        return text[:len(text) - hold]

    def _detok(self, ids: list[int], params: SamplingParams) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)

    # ----------------------------------------------------------------- logprobs
    def _prompt_logprobs(self, s: RunningRequest, rows: torch.Tensor) -> None:
        """Hidden rows of positions logits_from..n-2 score the prompt's tokens logits_from+1..n-1."""
        start = s.request.logprob_start_len
        if start == 0:
            s.input_logprobs.append([None, int(s.prompt_ids[0]), self._token_text(s, int(s.prompt_ids[0]))])
            s.input_top.append(None)
        targets = s.prompt_ids[s.logits_from + 1:].tolist()
        for i in range(0, len(rows), LOGPROB_ROWS_PER_CHUNK):
            logits = self.model.logits(rows[i:i + LOGPROB_ROWS_PER_CHUNK])
            self._record_logprobs(s, logits, targets[i:i + LOGPROB_ROWS_PER_CHUNK], s.input_logprobs, s.input_top)

    def _record_logprobs(self, s: RunningRequest, logits: torch.Tensor, tokens: list[int], out: list, top: list) -> None:
        logp = torch.log_softmax(logits.float(), -1)
        chosen = logp.gather(1, torch.tensor(tokens, device=logp.device).unsqueeze(1))[:, 0].tolist()
        out.extend([lp, t, self._token_text(s, t)] for lp, t in zip(chosen, tokens))
        k = s.request.top_logprobs_num
        if k:
            values, ids = logp.topk(k, -1)
            for vs, ts in zip(values.tolist(), ids.tolist()):
                top.append([[v, t, self._token_text(s, t)] for v, t in zip(vs, ts)])

    def _token_text(self, s: RunningRequest, token: int) -> str | None:
        return self.tokenizer.decode([token]) if s.request.return_text_in_logprobs else None

    # ----------------------------------------------------------------- memory
    def _alloc(self, need: int) -> torch.Tensor:
        slots = self.cache.alloc_slots(need)
        if slots is None:
            raise PoolExhausted(f"KV pool full: need {need} slots, {self.allocator.available_size()} free of "
                                f"{self.allocator.size} and the rest held by running requests; raise kv_cache_gb")
        return slots

    def _release(self, s: RunningRequest) -> None:
        if s.private:
            private = self._publish_prefix(s, torch.cat(s.private))
            self.allocator.free(private)  # one free, not one per decoded token
        s.private = []
        if s.prefix_node is not None:
            self.cache.dec_lock_ref(s.prefix_node)
            s.prefix_node = None
        for d in s.documents:
            self.cache.dec_lock_ref(d)
        s.documents = []
        if s.row is not None:
            self.req_to_token_pool.free(s.row)
            s.row = None

    def _result(self, s: RunningRequest) -> GenerateResult:
        if s.first_token_at is not None:
            s.stats.decode_s = time.perf_counter() - s.first_token_at
        logprobs = s.request.return_logprob
        return GenerateResult(s.text, list(s.output_ids), s.prompt_ids.tolist(), s.finish_reason or {},
                              s.policy.name, s.stats, s.recomputed_positions, s.first_logits,
                              s.input_logprobs if logprobs else None, s.output_logprobs if logprobs else None,
                              s.input_top if logprobs and s.request.top_logprobs_num else None,
                              s.output_top if logprobs and s.request.top_logprobs_num else None)

    # ----------------------------------------------------------------- identity
    def _fingerprint(self) -> str:
        h = hashlib.sha256((Path(self.model_dir) / "config.json").read_bytes() + self.load_format.encode())
        for f in sorted(Path(self.model_dir).glob("*.safetensors")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
        h.update(str(self.dtype).encode())
        if self.load_format == "dummy":  # random weights differ per instance: never share their KV
            h.update(secrets.token_bytes(16))
        return h.hexdigest()[:16]

    def _eos_token_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
        return ids
