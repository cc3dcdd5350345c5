"""ctypes mirrors of the C structs that cross the Python/C boundary: the one description of each.

Every struct the Python side fills or reads through ctypes is declared here and nowhere else. The
kernel templates render, from these mirrors, compile-time checks into the generated source (see
`layout_checks` and templates/abi_checks.jinja): each field's offset, size and type, the struct's
size and its number of fields. A mirror that drifts from its C struct (a field added, removed,
renamed, reordered or retyped on one side only) then fails the build instead of shifting fields
at run time; the checks are part of the rendered source, hence of the cache key.

The C structs: templates/include/flashinfer_jit/prefill_plan.h (WorkItem, MergeEntry, PlanConfig,
PlanResult, PageTableCheck, UploadLayout), plan_upload.h (PlanCall), prefill_params.h
(PrefillParams) and page.cuh (AppendParams).
"""
from __future__ import annotations

import ctypes
from typing import Any

_i32, _i64, _u32, _f32, _ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_uint32, ctypes.c_float, ctypes.c_void_p


def _ints(ctype: Any, *names: str) -> list[tuple[str, Any]]:
    return [(name, ctype) for name in names]


# ---- the prefill planner (prefill_plan.h, plan_upload.h) ---------------------------------------

class WorkItem(ctypes.Structure):
    """One (request, packed q tile, KV chunk) of a plan: 64 bytes, read by the kernel as four 16-byte loads."""

    _fields_ = [*_ints(_i32, "request", "row_begin", "kv_begin", "kv_end", "partial", "merge", "num_chunks",
                       "partial_base", "q_start", "q_len", "kv_start", "kv_len", "page_start"),
                ("reserved", _i32 * 3)]


class MergeEntry(ctypes.Structure):
    """A split q tile: where its chunks' partial states are (host plans only; the kernel reads WorkItems)."""

    _fields_ = _ints(_i32, "request", "row_begin", "partial_base", "num_chunks")


ITEM_INTS = ctypes.sizeof(WorkItem) // 4
MERGE_INTS = ctypes.sizeof(MergeEntry) // 4


class PlanConfig(ctypes.Structure):
    _fields_ = _ints(_i32, "batch", "group", "num_kv_heads", "cta_q", "kv_tile", "target_ctas", "min_chunk_tiles",
                     "split_tiles", "window_left")


class PlanResult(ctypes.Structure):
    _fields_ = _ints(_i64, "num_items", "num_merges", "partial_rows", "error_index")


class UploadLayout(ctypes.Structure):
    """int32 offsets of the plan metadata in the device workspace (see workspace.IntLayout)."""

    _fields_ = _ints(_i64, "page_indices", "items", "counters", "total", "item_capacity", "merge_capacity",
                     "partial_slots")


class PlanCall(ctypes.Structure):
    """Every argument of plan_and_upload in one struct (one ctypes argument)."""

    _fields_ = [
        ("qo_indptr", _ptr), ("kv_indptr", _ptr), ("config", ctypes.POINTER(PlanConfig)),
        ("host", _ptr), ("layout", ctypes.POINTER(UploadLayout)), ("page_indptr", _ptr),
        ("page_indices", _ptr), ("num_page_indices", _i64), ("device", _ptr),
        ("stream", _ptr), ("host_free", _ptr), ("result", ctypes.POINTER(PlanResult)),
    ]


class PageTableCheck(ctypes.Structure):
    _fields_ = [("error_index", _i64), ("min_page", _i32), ("max_page", _i32)]


# ---- the prefill kernel (prefill_params.h) -----------------------------------------------------

class PrefillParams(ctypes.Structure):
    _fields_ = [
        ("q", _ptr), ("k", _ptr), ("v", _ptr), ("o", _ptr), ("lse", _ptr),
        *_ints(_i64, "q_stride_n", "q_stride_h", "k_stride_n", "k_stride_h", "v_stride_n", "v_stride_h",
               "o_stride_n", "o_stride_h"),
        ("items", _ptr), ("counts", _ptr), ("partial_o", _ptr), ("partial_lse", _ptr),
        *_ints(_i32, "num_qo_heads", "num_kv_heads", "group"), ("scale_log2", _f32), *_ints(_i32, "cta_q", "page_size"),
        ("page_indices", _ptr), ("stride_page", _i64),
        *_ints(_i64, "q_rows", "kv_rows"),  # first dims of q and k (pages when paged): the TMA bounds (sm90)
        ("page_div_mul", _u32), ("page_div_shift", _i32),
        ("merge_counters", _ptr),
        *_ints(_i32, "page_row_shift", "page_row_mask"),  # set by the C launcher
        *[(f"user_tensor{i}", _ptr) for i in range(4)],  # a user variant's per-head parameters
        ("custom_mask", _ptr), ("mask_offsets", _ptr),  # custom masks: packed bits, per-request byte offsets
        ("alibi_slopes_log2", _ptr), ("rope_freqs", _ptr),  # ALiBi slopes x log2(e); fused RoPE's frequencies
        ("k_scale_ptr", _ptr), ("v_scale_ptr", _ptr), ("k_scale", _f32), ("v_scale", _f32),  # fp8 K/V scales
        ("soft_cap_pre_tanh", _f32), ("user_scalars", _f32 * 8),  # soft-cap; a user variant's scalars
        ("window_left", _i32),  # the sliding window
        ("keys_rotated", _i32),  # RoPE: k already rotated by the launcher (a copy)
    ]


# ---- append_paged_kv_cache (page.cuh) ----------------------------------------------------------

class AppendParams(ctypes.Structure):
    _fields_ = [
        ("key", _ptr), ("value", _ptr),
        *_ints(_i64, "key_stride_n", "key_stride_h", "value_stride_n", "value_stride_h"),
        ("k_cache", _ptr), ("v_cache", _ptr),
        *_ints(_i64, "stride_page", "stride_n", "stride_h"),
        ("batch_indices", _ptr), ("positions", _ptr), ("kv_indices", _ptr), ("kv_indptr", _ptr),
        ("nnz", _i64), *_ints(_i32, "num_kv_heads", "page_size", "num_pages", "batch"),
        ("k_rcp_scale", _f32), ("v_rcp_scale", _f32),  # fp8 caches: 1 / scale
    ]


# ---- the standalone RoPE ops (rope.cuh) --------------------------------------------------------

class RopeParams(ctypes.Structure):
    _fields_ = [
        ("q", _ptr), ("k", _ptr), ("q_out", _ptr), ("k_out", _ptr), ("pos_ids", ctypes.POINTER(_i32)),
        *_ints(_i64, "q_stride_n", "q_stride_h", "k_stride_n", "k_stride_h", "qo_stride_n", "qo_stride_h",
               "ko_stride_n", "ko_stride_h", "nnz"),
        *_ints(_i32, "num_q_heads", "num_k_heads", "rotary_dim"), ("rcp_scale", _f32), ("rcp_theta", _f32),
        ("freqs", ctypes.POINTER(_f32)),  # or None: rcp_scale * rcp_theta^(2i / rotary_dim) in the kernel
        # paged k rows (gathers): page src_pages[t], slot pos_ids[t] % src_page_size; or None
        ("src_pages", ctypes.POINTER(_i32)), ("src_stride_page", _i64), ("src_page_size", _i32),
    ]


# The mirrors each kernel library's source checks (every struct it shares with the Python side).
PREFILL_STRUCTS: tuple[type[ctypes.Structure], ...] = (
    WorkItem, MergeEntry, PlanConfig, PlanResult, UploadLayout, PlanCall, PageTableCheck, PrefillParams)
PAGE_STRUCTS: tuple[type[ctypes.Structure], ...] = (AppendParams,)
ROPE_STRUCTS: tuple[type[ctypes.Structure], ...] = (RopeParams,)


# ---- compile-time checks -----------------------------------------------------------------------

_SCALARS: dict[Any, str] = {_i32: "int32_t", _i64: "int64_t", _u32: "uint32_t", _f32: "float"}


def _type_check(ctype: Any) -> tuple[str, str, int]:
    """(C++ predicate on `T`, the field's declared type; what it says in words; scalar slots)."""
    if ctype is _ptr:
        return "std::is_pointer<T>::value", "a pointer", 1
    if ctype in _SCALARS:
        return f"std::is_same<T, {_SCALARS[ctype]}>::value", _SCALARS[ctype], 1
    if isinstance(ctype, type) and issubclass(ctype, ctypes._Pointer):
        target = ctype._type_
        if isinstance(target, type) and issubclass(target, ctypes.Structure):
            pointee = f"fij::{target.__name__}"
        elif target in _SCALARS:
            pointee = _SCALARS[target]
        else:
            raise TypeError(f"no C type for a pointer to {target!r}")
        return (f"std::is_pointer<T>::value && std::is_same<std::remove_cv_t<std::remove_pointer_t<T>>, "
                f"{pointee}>::value", f"a pointer to {pointee}", 1)
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Array) and ctype._type_ in _SCALARS:
        element = _SCALARS[ctype._type_]
        return f"std::is_same<T, {element}[{ctype._length_}]>::value", f"{element}[{ctype._length_}]", ctype._length_
    raise TypeError(f"no C type for the ctypes type {ctype!r}")


def layout_checks(*mirrors: type[ctypes.Structure]) -> list[dict[str, Any]]:
    """What templates/abi_checks.jinja renders for each mirror: the C name (fij::<class name>), its
    size, its fields (name, offset, size, type predicate) and its scalar slots (an array field counts
    its elements: the C side counts fields by aggregate initialization, which flattens arrays)."""
    structs = []
    for mirror in mirrors:
        fields, slots = [], 0
        for name, ctype in mirror._fields_:
            check, type_name, n = _type_check(ctype)
            descriptor = getattr(mirror, name)
            fields.append({"name": name, "offset": descriptor.offset, "size": descriptor.size, "check": check,
                           "type": type_name})
            slots += n
        structs.append({"name": mirror.__name__, "size": ctypes.sizeof(mirror), "slots": slots, "fields": fields})
    return structs
