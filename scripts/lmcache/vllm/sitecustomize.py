"""kvgate's CPU connector shim for LMCache 0.5.6 inside vLLM-CPU.

Why this exists: LMCache moves KV between the serving engine's paged cache and
its own chunk buffers with device copy kernels (CUDA, XPU, MUSA, HPU). It has
none for vLLM's CPU backend, so `CreateGPUConnector` raises
`RuntimeError: No supported cpu connector found.` and LMCacheConnectorV1 falls
back to recomputing every prompt (no `lm://` traffic at all). This module
stands in for that missing CPU kernel: when Python starts with this directory
on PYTHONPATH, it waits for `lmcache.v1.gpu_connector` to be imported and
swaps its `CreateGPUConnector` for one that, on a CPU-only vLLM, returns
`CpuPagedConnector` below (plain torch indexing, no native code). Every other
device and engine goes to LMCache's own factory unchanged.

vLLM-CPU's per-layer KV tensor is `[num_blocks, num_kv_heads, block_size,
2 * head_dim]`, but that is only the allocation shape: the attention backend
views each (block, head) as `[2 * block_size, head_dim]`, keys in the first
half and values in the second, and the key half is packed in an ISA-specific
tile order (AMX, AVX-512, ...). So rather than assume an order, the connector
asks vLLM's own `cpu_attn_reshape_and_cache` op, once, where it puts each
(kv, token, head, dim) of a block, and keeps that map as a gather index.
Chunks therefore leave in LMCache's standard KV_2LTD layout
`[2, layers, tokens, kv_heads * head_dim]` (the same bytes a GPU engine would
store), and come back through the inverse scatter.

Set KVGATE_LMCACHE_SHIM_DEBUG=1 for one log line with the real tensor shapes,
strides and the probed layout. Only plain attention (no MLA), KV dtype equal
to the model dtype (no fp8 KV cache), non-layerwise mode.
"""

import importlib.abc
import os
import sys

_TARGET = "lmcache.v1.gpu_connector"


def _log(msg):
    print(f"[kvgate-lmcache-shim pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


def _probe_block_layout(dtype, num_kv_heads, block_size, head_dim):
    """Where vLLM's CPU cache op writes each element of one block.

    Returns a long tensor G of shape [2, block_size, num_kv_heads, head_dim]:
    G[kv, t, h, d] is the offset, inside one flattened block of the per-layer
    tensor, of (K if kv == 0 else V) of token t, head h, dim d.
    """
    import torch
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, head_dim, "auto")
    shape = (block_size, num_kv_heads, head_dim)
    t = torch.arange(block_size).view(-1, 1, 1).expand(shape)
    h = torch.arange(num_kv_heads).view(1, -1, 1).expand(shape)
    d = torch.arange(head_dim).view(1, 1, -1).expand(shape)
    # One probe per coordinate; values stay small integers (exact in bf16),
    # +(i + 1) for keys and -(i + 1) for values so the sign tells K from V.
    found = []
    for coord in (t, h, d):
        assert int(coord.max()) + 1 <= 256, "probe values must be exact in the KV dtype"
        cache = torch.zeros(1, num_kv_heads, block_size, 2 * head_dim, dtype=dtype)
        view = cache.view(1, num_kv_heads, 2 * block_size, head_dim)
        key_cache, value_cache = view.chunk(2, dim=2)
        val = (coord + 1).to(dtype).contiguous()
        ops.cpu_attn_reshape_and_cache(
            val, -val, key_cache, value_cache,
            torch.arange(block_size, dtype=torch.long), isa,
        )
        found.append(cache.flatten().to(torch.float32))
    tv, hv, dv = found
    assert bool((tv != 0).all()), "probe: some cache element was not written"
    kv = (tv < 0).long()
    ti, hi, di = (x.abs().long() - 1 for x in found)
    gather = torch.full((2, block_size, num_kv_heads, head_dim), -1, dtype=torch.long)
    gather[kv, ti, hi, di] = torch.arange(tv.numel())
    assert bool((gather >= 0).all()), "probe: the block layout is not a permutation"
    plain = (
        torch.arange(tv.numel())
        .view(num_kv_heads, 2, block_size, head_dim)
        .permute(1, 2, 0, 3)
    )
    return gather, isa, bool(torch.equal(gather, plain))


def _make_connector_class():
    import torch
    from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface
    from lmcache.v1.memory_management import MemoryFormat

    class CpuPagedConnector(GPUConnectorInterface):
        """vLLM-CPU paged KV <-> LMCache KV_2LTD memory objects, by torch indexing."""

        def __init__(self, num_layers, num_kv_heads, head_dim, dtype):
            self.num_layers = num_layers
            self.num_kv_heads = num_kv_heads
            self.head_dim = head_dim
            self.dtype = dtype
            self.block_size = None
            self.gather = None  # [2, block_size, heads, head_dim] offsets in a block

        def get_shape(self, num_tokens):
            return torch.Size([2, self.num_layers, num_tokens, self.num_kv_heads * self.head_dim])

        def _layers(self, kwargs):
            kvcaches = kwargs.get("kvcaches")
            if kvcaches is None:
                raise ValueError("kvgate shim: 'kvcaches' missing from kwargs")
            if "slot_mapping" not in kwargs:
                raise ValueError("kvgate shim: 'slot_mapping' missing from kwargs")
            if self.gather is None:
                self._init_layout(kvcaches)
            # One block per row: [num_blocks, heads * 2 * block_size * head_dim].
            return [kv.view(kv.shape[0], -1) for kv in kvcaches]

        def _init_layout(self, kvcaches):
            first = kvcaches[0]
            if len(kvcaches) != self.num_layers or first.dim() != 4:
                raise RuntimeError(
                    f"kvgate shim: expected {self.num_layers} tensors [blocks, heads, block, 2*head_dim],"
                    f" got {len(kvcaches)} of shape {tuple(first.shape)}"
                )
            _, heads, block_size, last = first.shape
            if heads != self.num_kv_heads or last != 2 * self.head_dim or first.dtype != self.dtype:
                raise RuntimeError(
                    f"kvgate shim: KV tensor {tuple(first.shape)} {first.dtype} does not match"
                    f" {self.num_kv_heads} heads x {self.head_dim} dims {self.dtype}"
                )
            if not all(kv.is_contiguous() for kv in kvcaches):
                raise RuntimeError("kvgate shim: KV tensors are not contiguous")
            try:
                gather, isa, plain = _probe_block_layout(first.dtype, heads, block_size, self.head_dim)
            except Exception as exc:  # no probe possible: the unpacked order
                _log(f"layout probe failed ({exc!r}); assuming the unpacked [2, block, dim] order")
                gather, isa, plain = (
                    torch.arange(heads * 2 * block_size * self.head_dim)
                    .view(heads, 2, block_size, self.head_dim)
                    .permute(1, 2, 0, 3)
                    .contiguous(),
                    "?",
                    True,
                )
            self.block_size = block_size
            self.gather = gather
            if os.environ.get("KVGATE_LMCACHE_SHIM_DEBUG"):
                _log(
                    f"kv layers={len(kvcaches)} shape={tuple(first.shape)} stride={first.stride()}"
                    f" dtype={first.dtype} isa={isa} key/value order plain={plain}"
                )

        def _index(self, slots):
            """Row (block) and column (offset in block) indexes, each [2, T, heads, head_dim]."""
            blocks = torch.div(slots, self.block_size, rounding_mode="floor")
            cols = self.gather[:, slots % self.block_size]  # [2, T, heads, head_dim]
            return blocks.view(1, -1, 1, 1).expand_as(cols), cols

        def from_gpu(self, memory_obj, start, end, **kwargs):
            layers = self._layers(kwargs)
            slots = kwargs["slot_mapping"][start:end].to(device="cpu", dtype=torch.long)
            rows, cols = self._index(slots)
            n = end - start
            out = memory_obj.tensor  # [2, layers, >= n tokens, heads * head_dim]
            for i, flat in enumerate(layers):
                out[:, i, :n].copy_(flat[rows, cols].view(2, n, -1))
            memory_obj.metadata.fmt = MemoryFormat.KV_2LTD

        def to_gpu(self, memory_obj, start, end, **kwargs):
            layers = self._layers(kwargs)
            if memory_obj.metadata.fmt != MemoryFormat.KV_2LTD:
                raise ValueError(f"kvgate shim: memory object format {memory_obj.metadata.fmt}")
            # Tokens vLLM already holds itself are left alone (as LMCache's kernels do).
            skip = min(end - start, max(0, kwargs.get("vllm_cached_tokens", 0) - start))
            if skip == end - start:
                return
            slots = kwargs["slot_mapping"][start + skip:end].to(device="cpu", dtype=torch.long)
            rows, cols = self._index(slots)
            src = memory_obj.tensor[:, :, skip:end - start]
            heads, dim = self.num_kv_heads, self.head_dim
            for i, flat in enumerate(layers):
                flat[rows, cols] = src[:, i].reshape(2, -1, heads, dim)

        def batched_from_gpu(self, memory_objs, starts, ends, **kwargs):
            for obj, s, e in zip(memory_objs, starts, ends):
                self.from_gpu(obj, s, e, **kwargs)

        def batched_to_gpu(self, memory_objs=None, starts=None, ends=None, **kwargs):
            for obj, s, e in zip(memory_objs, starts, ends):
                self.to_gpu(obj, s, e, **kwargs)

    return CpuPagedConnector


def _patch(module):
    original = module.CreateGPUConnector

    def create_gpu_connector(config, metadata, engine, layout_hints=None):
        from lmcache import torch_device_type
        from lmcache.utils import EngineType

        if engine != EngineType.VLLM or torch_device_type != "cpu":
            return original(config, metadata, engine, layout_hints=layout_hints)
        if metadata.use_mla or config.use_layerwise or config.enable_blending:
            raise RuntimeError("kvgate shim: MLA, layerwise and blending are not supported on CPU")
        num_layers, _, _, num_kv_heads, head_dim = metadata.kv_shape
        _log(f"CPU connector for {num_layers} layers x {num_kv_heads} kv heads x {head_dim} ({metadata.kv_dtype})")
        return _make_connector_class()(num_layers, num_kv_heads, head_dim, metadata.kv_dtype)

    module.CreateGPUConnector = create_gpu_connector


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Lets the real module load, then patches it: nothing is imported early."""

    busy = False

    def find_spec(self, name, path=None, target=None):
        if name != _TARGET or self.busy:
            return None
        self.busy = True
        try:
            import importlib.util

            spec = importlib.util.find_spec(name)
        finally:
            self.busy = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("KVGATE_LMCACHE_SHIM", "1") != "0":
    if _TARGET in sys.modules:
        _patch(sys.modules[_TARGET])
    else:
        sys.meta_path.insert(0, _PatchOnImport())
