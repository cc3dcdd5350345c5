"""flashinfer-jit as a Hugging Face transformers attention implementation.

    import flashinfer_jit.transformers_attention as fij_attention
    fij_attention.register()                    # name "fij_varlen" (transformers' AttentionInterface)
    model.set_attn_implementation("fij_varlen")  # or config._attn_implementation on older versions
    logits = model(input_ids, position_ids=position_ids, **fij_attention.packed_kwargs(seq_lens)).logits

It runs the ragged prefill wrapper (BatchPrefillWithRaggedKVCacheWrapper: the sm90 kernel on Hopper, the
FA2-class one elsewhere) over a *packed* batch: the sequences of a batch concatenated along one row of
`input_ids` (batch size 1), each starting at position 0, with `cu_seq_lens_q` / `cu_seq_lens_k` (int32
prefix sums of the lengths, what transformers' padding-free path passes to FlashAttention-2) or, without
them, the starts of the sequences read off `position_ids`. A batch of several rows without those is
taken as that many equal-length sequences. The mask registered with it is transformers' FlashAttention
one (None when nothing is padded).

Sliding windows (`sliding_window` W: a query sees its last W keys, itself included, as in
transformers' masks: window_left = W - 1) and logit soft-caps (`softcap`, Gemma 2) run as the kernels'
variants. Stricter than transformers' FlashAttention-2 integration: a padding mask, dropout, a KV cache
(decoding) or attention weights (`output_attentions`) raise NotSupportedError before any kernel runs
instead of being ignored; pack the batch instead of padding it.
One plan per distinct batch (lengths, heads, head_dim, dtype, scale, device) is kept and shared by every
layer of a forward pass, so plan() runs once per forward, not once per layer.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional, Sequence

import torch

from .errors import NotSupportedError
from .prefill import BatchPrefillWithRaggedKVCacheWrapper

# Not "flashinfer_jit": transformers 5 takes any implementation whose name contains "flash" for a
# FlashAttention package and tries to import one (is_flash_attention_requested), so register() refuses it.
NAME = "fij_varlen"
_WHERE = "flashinfer_jit.transformers_attention"
_PLANS_KEPT = 8
_WORKSPACE_BYTES = 128 << 20
_plans: "OrderedDict[tuple, BatchPrefillWithRaggedKVCacheWrapper]" = OrderedDict()
_workspaces: dict[torch.device, torch.Tensor] = {}


def packed_kwargs(seq_lens: Sequence[int]) -> dict[str, Any]:
    """The keyword arguments of a model forward over `seq_lens` packed into one row: transformers'
    FlashAttention kwargs, which it forwards to the attention implementation of every layer. The prefix
    sums stay on the CPU: every layer's plan lookup reads them without a device sync."""
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(list(seq_lens), dtype=torch.int64), 0).to(torch.int32)
    longest = max(seq_lens) if len(seq_lens) else 0
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _lengths_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """int32 prefix sums of the packed sequences' lengths: a sequence starts wherever its position is 0."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise NotSupportedError("position_ids", tuple(position_ids.shape), "shape [1, total_tokens] (a packed batch)",
                                _WHERE)
    pos = position_ids[0].to("cpu")
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError(f"{_WHERE}: position_ids of a packed batch must start every sequence at 0, got "
                         f"{pos[:8].tolist()}...")
    cu = torch.cat([starts, torch.tensor([pos.numel()])]).to(torch.int32)
    return cu


def _variant(module: torch.nn.Module, kwargs: dict[str, Any]) -> tuple[int, float]:
    """(window_left, logits_soft_cap) from transformers' sliding_window / softcap (the call's, else the
    module's): W keys up to and including the query's own -> window_left W - 1."""
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    cap = kwargs.get("softcap", getattr(module, "softcap", None))
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"{_WHERE}: sliding_window={window!r}: expected None or a number of keys >= 1")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0):
        raise ValueError(f"{_WHERE}: softcap={cap!r}: expected None or a cap > 0")
    return (window - 1 if window is not None else -1), (float(cap) if cap is not None else 0.0)


def _check(module: torch.nn.Module, attention_mask: Optional[torch.Tensor], dropout: float,
           kwargs: dict[str, Any]) -> None:
    if attention_mask is not None:
        raise NotSupportedError("attention_mask", "a padding mask", "None: pack the batch (one row, "
                                "cu_seq_lens_q / position_ids) instead of padding it", _WHERE)
    if dropout:
        raise NotSupportedError("dropout", dropout, "0.0 (inference kernels)", _WHERE)
    if kwargs.get("output_attentions"):
        raise NotSupportedError("output_attentions", True, "False (the kernel never forms the weights)", _WHERE)


def _wrapper(device: torch.device, cu: torch.Tensor, num_qo_heads: int, num_kv_heads: int, head_dim: int,
             dtype: torch.dtype, scale: float, causal: bool,
             variant: tuple[int, float] = (-1, 0.0)) -> BatchPrefillWithRaggedKVCacheWrapper:
    cu_host = cu.to("cpu", torch.int32)
    key = (device, tuple(cu_host.tolist()), num_qo_heads, num_kv_heads, head_dim, dtype, float(scale), causal,
           variant)
    wrapper = _plans.get(key)
    if wrapper is not None:
        _plans.move_to_end(key)
        return wrapper
    workspace = _workspaces.get(device)
    if workspace is None:
        workspace = _workspaces[device] = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    # One workspace per device: the kept plans run one after another on the caller's stream.
    wrapper = BatchPrefillWithRaggedKVCacheWrapper(workspace, kv_layout="NHD")
    wrapper.plan(cu_host, cu_host, num_qo_heads, num_kv_heads, head_dim, causal=causal, sm_scale=scale,
                 q_data_type=dtype, window_left=variant[0], logits_soft_cap=variant[1])
    _plans[key] = wrapper
    if len(_plans) > _PLANS_KEPT:
        _plans.popitem(last=False)
    return wrapper


def _prefix_sums(query: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The batch's sequences as int32 prefix sums of their lengths (see the module docstring)."""
    batch, _, tokens, _ = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        if batch != 1:
            raise NotSupportedError("query", tuple(query.shape), "batch size 1 with cu_seq_lens_q (a packed batch)",
                                    _WHERE)
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and cu_k is not cu and not torch.equal(cu_k.to(cu.device), cu):
            raise NotSupportedError("cu_seq_lens_k", "different from cu_seq_lens_q", "equal (self-attention)",
                                    _WHERE)
        return cu
    if batch == 1 and kwargs.get("position_ids") is not None:
        return _lengths_from_position_ids(kwargs["position_ids"])
    return torch.arange(0, batch * tokens + 1, tokens, dtype=torch.int32)  # equal-length rows


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [batch, Hq, tokens, D], key / value
    [batch, Hkv, tokens, D]; returns ([batch, tokens, Hq, D], None). cu_seq_lens_q on the CPU saves a
    device-to-host copy per layer (packed_kwargs makes them there)."""
    _check(module, attention_mask, dropout, kwargs)
    variant = _variant(module, kwargs)
    batch, num_qo_heads, tokens, head_dim = query.shape
    if key.shape[2] != tokens:  # a KV cache in use: decoding, or a prefix in the cache
        raise NotSupportedError("key", f"{key.shape[2]} cached + new tokens for {tokens} queries",
                                "as many keys as queries (prefill of whole sequences, no KV cache)", _WHERE)
    num_kv_heads = key.shape[1]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    scale = float(scaling if scaling is not None else head_dim ** -0.5)
    cu = _prefix_sums(query, kwargs)
    # [batch, H, tokens, D] -> [batch * tokens, H, D]: a view when the projections are token-major.
    q = query.transpose(1, 2).reshape(batch * tokens, num_qo_heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * tokens, num_kv_heads, head_dim)
    v = value.transpose(1, 2).reshape(batch * tokens, num_kv_heads, head_dim)
    wrapper = _wrapper(query.device, cu, num_qo_heads, num_kv_heads, head_dim, query.dtype, scale, causal, variant)
    out = wrapper.run(q, k, v)
    return out.view(batch, tokens, num_qo_heads, head_dim), None


def register(name: str = NAME) -> str:
    """Register attention_forward (and transformers' FlashAttention mask) under `name` with transformers'
    AttentionInterface / AttentionMaskInterface; returns the name. Needs transformers (an optional extra:
    pip install 'flashinfer-jit[transformers]')."""
    try:
        from transformers import AttentionInterface
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"{_WHERE}.register() needs transformers: pip install 'flashinfer-jit[transformers]'") from exc
    if "flash" in name.lower():
        raise ValueError(f"{_WHERE}.register(name={name!r}): transformers takes any attention implementation "
                         "whose name contains 'flash' for a FlashAttention package and tries to import it; "
                         f"choose a name without it (the default is {NAME!r})")
    AttentionInterface.register(name, attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError:  # transformers without the mask interface builds no mask for custom attention
        return name
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name
