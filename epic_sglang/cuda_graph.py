"""CUDA graphs: decode steps (`DecodeGraphs`) and querylink's scout (`ScoutGraphs`).

Decode (GPU, FlashInfer with fused RoPE): nano-vllm's recipe with SGLang's FlashInfer wiring.

One graph per batch-size bucket captures the whole decode forward (embedding, every layer,
logits) over static input buffers; a step copies its tokens and output slots into them,
plans a FlashInfer decode wrapper whose index buffers the graph reads (plan runs outside
the graph, so context lengths may change freely), and replays. Padding rows write to and
read from slot 0, the pool's reserved padding slot. A decode step of a 8B model is
launch-bound (hundreds of small kernels), which is what the graph removes.
"""
from __future__ import annotations

import torch

from epic_sglang.forward_batch import ForwardBatch
from epic_sglang.kv_pool import KVPool
from epic_sglang.linker import Linker
from epic_sglang.models.decoder import CausalLM
from epic_sglang.scout_attention import ScoutAttention, ScoutSeq, scored_layers

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)
SCOUT_BUCKETS = (16, 32, 64, 128, 256)  # question tokens a scout graph computes
PAD_SLOT = 0


class DecodeGraphs:
    def __init__(self, model: CausalLM, pool: KVPool, attn, max_batch: int, max_kv_tokens: int):
        """`max_kv_tokens`: the most key entries one step reads (every row's, summed)."""
        import flashinfer

        self.model, self.pool, self.attn = model, pool, attn
        self.buckets = [b for b in BATCH_BUCKETS if b <= max_batch] or [1]
        top, dev = self.buckets[-1], attn.device
        self.input_ids = torch.zeros(top, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(top, dtype=torch.int64, device=dev)  # unused by fused RoPE; ForwardBatch's shape
        self.out_slots = torch.full((top,), PAD_SLOT, dtype=torch.int64, device=dev)
        self.indptr = torch.zeros(top + 1, dtype=torch.int32, device=dev)
        self.indices = torch.zeros(max_kv_tokens + top, dtype=torch.int32, device=dev)
        self.last_page_len = torch.ones(top, dtype=torch.int32, device=dev)
        self.wrappers, self.graphs, self.logits = {}, {}, {}
        mempool = None
        for bs in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory
            self.wrappers[bs] = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                attn.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
                paged_kv_indptr_buffer=self.indptr[:bs + 1], paged_kv_indices_buffer=self.indices,
                paged_kv_last_page_len_buffer=self.last_page_len[:bs])
            self._plan(bs, [torch.tensor([PAD_SLOT], device=dev)] * bs)
            batch = ForwardBatch(self.input_ids[:bs], self.positions[:bs], self.out_slots[:bs], [])
            with torch.inference_mode():
                self._forward(batch)  # warm up outside capture (allocator, lazy inits)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=mempool):
                    self.logits[bs] = self._forward(batch)
            mempool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model.logits(self.model.forward(batch, self.pool, self.attn))

    def _plan(self, bs: int, kv_slots: list[torch.Tensor]) -> None:
        self.attn.plan_decode(self.wrappers[bs], kv_slots)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, out_slots: torch.Tensor, kv_slots: list[torch.Tensor]) -> torch.Tensor:
        """Logits (n, vocab) of one decode token per sequence; `kv_slots[i]` ends with `out_slots[i]`."""
        n = input_ids.numel()
        bs = next(b for b in self.buckets if b >= n)
        self.input_ids[:n].copy_(input_ids)
        self.out_slots[:n].copy_(out_slots)
        self.out_slots[n:bs].fill_(PAD_SLOT)
        pad = [torch.tensor([PAD_SLOT], device=self.attn.device)] * (bs - n)
        self._plan(bs, list(kv_slots) + pad)
        self.graphs[bs].replay()
        return self.logits[bs][:n]


class ScoutGraphs:
    """querylink's scout of one request, replayed from a CUDA graph per (question-length
    bucket, stride), captured at its first use. The scout computes a few dozen tokens through
    every layer: eagerly its ~15 launches and Python per layer (~1.2 ms) dwarf the GPU's work,
    so the host paced it (38 ms at 16K and at 32K on an H100, BENCHMARKS.md). Its attention
    (`ScoutAttention`, Triton) reads the row through a static slot buffer and the key count from
    the device, so one graph serves every context up to `max_keys`; padding queries sit at
    position -1 (they see nothing and are not scored) and write their K/V to slot 0, the pool's
    padding slot. Any RoPE: keys are rotated by a table of angles made once."""

    def __init__(self, linker: Linker, max_keys: int):
        cfg, dev = linker.model.config, linker.pool.get_key_buffer(0).device
        self.linker, self.max_keys, self.num_layers = linker, max_keys, cfg.num_layers
        top = SCOUT_BUCKETS[-1]
        self.input_ids = torch.zeros(top, dtype=torch.int64, device=dev)
        self.positions = torch.full((top,), -1, dtype=torch.int64, device=dev)
        self.out_slots = torch.full((top,), PAD_SLOT, dtype=torch.int64, device=dev)
        self.weights = torch.zeros(top, dtype=torch.float32, device=dev)
        self.q_cos, self.q_sin = (torch.zeros(top, cfg.head_dim, dtype=torch.float32, device=dev) for _ in range(2))
        self.slots = torch.zeros(max_keys, dtype=torch.int64, device=dev)
        self.num_keys = torch.ones(1, dtype=torch.int32, device=dev)
        self.key_angles = linker.rotary.angles(torch.arange(max_keys))
        self.mass = torch.zeros(cfg.num_kv_heads, max_keys, dtype=torch.float32, device=dev)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._mempool = None

    def fits(self, num_queries: int, num_keys: int) -> bool:
        return num_queries <= SCOUT_BUCKETS[-1] and num_keys <= self.max_keys

    def _graph(self, bucket: int, stride: int) -> torch.cuda.CUDAGraph:
        if (bucket, stride) not in self.graphs:
            seq = ScoutSeq(0, bucket, self.positions[:bucket], self.weights[:bucket],
                           (self.q_cos[:bucket], self.q_sin[:bucket]), self.slots, self.key_angles,
                           self.num_keys, self.max_keys, self.mass)
            scout = ScoutAttention([seq], scored_layers(self.num_layers, stride))
            batch = ForwardBatch(self.input_ids[:bucket], self.positions[:bucket], self.out_slots[:bucket], [])

            def forward() -> None:
                self.mass.zero_()
                self.linker.run_scout(batch, scout)

            forward()  # compiles the kernels and warms the allocator, outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._mempool):
                forward()
            self._mempool = graph.pool()
            self.graphs[bucket, stride] = graph
        return self.graphs[bucket, stride]

    @torch.inference_mode()
    def run(self, part: tuple, positions: list[int], scored: list[bool], stride: int) -> torch.Tensor:
        """(n,) fp32: the scout's mass over the row `part[3]` (`part` as `ForwardBatch.build`
        takes it: input ids, positions, output slots and row of the scouted tokens, on the
        device; `positions` and `scored` on the host)."""
        ids, pos, out_slots, row = part
        nq, n = len(positions), row.numel()
        bucket = next(b for b in SCOUT_BUCKETS if b >= nq)
        self.input_ids[:nq].copy_(ids)
        self.input_ids[nq:bucket].zero_()
        self.positions[:nq].copy_(pos)
        self.positions[nq:bucket].fill_(-1)
        self.out_slots[:nq].copy_(out_slots)
        self.out_slots[nq:bucket].fill_(PAD_SLOT)
        self.weights[:bucket].copy_(torch.tensor(scored + [False] * (bucket - nq), dtype=torch.float32), non_blocking=True)
        cos, sin = self.linker.rotary.cos_sin(torch.tensor(positions + [0] * (bucket - nq)), torch.float32)
        self.q_cos[:bucket].copy_(cos)
        self.q_sin[:bucket].copy_(sin)
        self.slots[:n].copy_(row)
        self.num_keys.fill_(n)
        self._graph(bucket, stride).replay()
        return self.mass[:, :n].sum(0)
