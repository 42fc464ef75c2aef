"""CUDA graphs for decode steps (GPU, FlashInfer with fused RoPE): nano-vllm's recipe with
SGLang's FlashInfer wiring.

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
from epic_sglang.models.decoder import CausalLM

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)
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
