"""Attention backends for the Next-DiT: flash-attn (varlen) on CUDA, PyTorch SDPA everywhere else.

Both compute the same non-causal, key-padding-masked grouped-query attention with softmax scale
``1/sqrt(head_dim)`` (spec §1.2 "Joint attention"). The official code uses flash-attn varlen for
bf16/fp16 and SDPA with a boolean key mask for fp32; we do the same, but a missing flash-attn is
never an error: SDPA is always available.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # flash-attn is an optional GPU extra; a kernel-less build raises ImportError too (env §3)
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    HAS_FLASH_ATTN = True
except ImportError:  # pragma: no cover - depends on the host
    flash_attn_func = flash_attn_varlen_func = None
    HAS_FLASH_ATTN = False

BACKENDS = ("auto", "sdpa", "flash")


def _flash_usable(q: torch.Tensor) -> bool:
    return HAS_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    backend: str = "auto",
) -> torch.Tensor:
    """Grouped-query self-attention with a key-padding mask.

    Args:
        q: (B, L, Hq, D) queries (already normed and rotated).
        k, v: (B, L, Hkv, D) keys/values; query head ``h`` uses KV head ``h // (Hq // Hkv)``.
        mask: (B, L) bool, True on real tokens, or None when nothing is padded.
        backend: ``auto`` (flash-attn when installed, on CUDA, in fp16/bf16; else SDPA), ``sdpa``
            or ``flash`` (raises when flash-attn cannot run here).

    Returns:
        (B, L, Hq, D). Rows of padded queries hold finite values that callers ignore.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "flash" and not _flash_usable(q):
        raise RuntimeError(
            "attention backend 'flash' needs flash-attn installed, CUDA tensors and fp16/bf16 "
            f"(flash-attn installed: {HAS_FLASH_ATTN}, device: {q.device}, dtype: {q.dtype}). "
            "Use backend 'auto' or 'sdpa'."
        )
    if backend != "sdpa" and _flash_usable(q):
        return _flash(q, k, v, mask)
    return _sdpa(q, k, v, mask)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    attn_mask = None if mask is None else mask[:, None, None, :]
    gqa = q.shape[2] != k.shape[2]
    if gqa and mask is not None and q.is_cuda:
        # CUDA SDPA's flash kernel (the one that takes enable_gqa) has no masks, and a masked
        # enable_gqa call can fall back to the O(L^2)-memory math kernel; expanding K/V (same
        # head mapping h -> h // rep) keeps the masked call on the memory-efficient kernel.
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        gqa = False
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=attn_mask,
        enable_gqa=gqa,
    )
    return out.transpose(1, 2)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None or bool(mask.all()):
        return flash_attn_func(q, k, v, causal=False)
    # Our own unpad/pad (flash_attn.bert_padding is unreachable on kernel-less builds, env §3).
    batch, seqlen = mask.shape
    lengths = mask.sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    max_len = int(lengths.max())
    index = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    qu, ku, vu = (t.flatten(0, 1).index_select(0, index) for t in (q, k, v))
    out_unpadded = flash_attn_varlen_func(
        qu, ku, vu,
        cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_len, max_seqlen_k=max_len,
        causal=False,
    )
    out = q.new_zeros(batch * seqlen, *q.shape[2:])
    out.index_copy_(0, index, out_unpadded)
    return out.view_as(q)
