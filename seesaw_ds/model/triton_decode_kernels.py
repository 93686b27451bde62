"""The Triton source of :mod:`seesaw_ds.model.triton_decode`'s kernels, as plain functions: that module wraps
them with ``triton.jit`` on a GPU or with Triton's interpreter on a CPU (the tests). They live in a module of
their own because the interpreter patches ``tl`` in the globals of the function it runs, and because importing
this module imports Triton, which only the GPU path (and the tests) should pay for.
"""
import triton.language as tl


def attend(query, keys, values, block_table, lengths, out, part_max, part_sum, part_acc,
           stride_qn, stride_qh, stride_tn, stride_on, stride_oh, scale, softcap, window, blocks_per_part,
           KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr,
           DIM_P: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, PARTS: tl.constexpr,
           SOFTCAP: tl.constexpr, WINDOW: tl.constexpr):
    """One (sequence, KV head, partition): the online softmax over the partition's blocks (see triton_decode)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    length = tl.load(lengths + seq)
    start = 0
    if WINDOW:
        start = tl.maximum(length - window, 0)
    first = tl.maximum(part * blocks_per_part, start // BLOCK).to(tl.int32)
    last = tl.minimum(part * blocks_per_part + blocks_per_part, (length + BLOCK - 1) // BLOCK).to(tl.int32)

    group = tl.arange(0, GROUP_P)
    heads = kv_head * GROUP + group
    head_ok = group < GROUP
    dims = tl.arange(0, DIM_P)
    dim_ok = dims < HEAD_DIM
    q = tl.load(query + seq * stride_qn + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)    # [G, D]
    running_max = tl.full([GROUP_P], float("-inf"), tl.float32)
    running_sum = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, DIM_P], tl.float32)
    offsets = tl.arange(0, BLOCK_P)
    for index in range(first, last):
        block = tl.load(block_table + seq * stride_tn + index)
        tokens = index * BLOCK + offsets
        valid = (offsets < BLOCK) & (tokens < length) & (tokens >= start)
        slots = block * BLOCK + offsets
        where = slots[:, None] * (KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + dims[None, :]
        load_ok = valid[:, None] & dim_ok[None, :]
        k = tl.load(keys + where, mask=load_ok, other=0.0).to(tl.float32)              # [B, D]
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale                   # [G, B]
        if SOFTCAP:
            capped = scores / softcap
            e = tl.exp(-2.0 * tl.abs(capped))
            scores = softcap * tl.where(capped >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))   # finite: every block read has a token
        weights = tl.exp(scores - new_max[:, None])
        rescale = tl.exp(running_max - new_max)
        v = tl.load(values + where, mask=load_ok, other=0.0).to(tl.float32)              # [B, D]
        running_sum = running_sum * rescale + tl.sum(weights, axis=1)
        acc = acc * rescale[:, None] + tl.sum(weights[:, :, None] * v[None, :, :], axis=1)
        running_max = new_max
    out_ok = head_ok[:, None] & dim_ok[None, :]
    if PARTS == 1:
        result = acc / running_sum[:, None]
        tl.store(out + seq * stride_on + heads[:, None] * stride_oh + dims[None, :],
                 result.to(out.dtype.element_ty), mask=out_ok)
    else:
        row = (seq * (KV_HEADS * GROUP) + heads) * PARTS + part                            # [G]
        tl.store(part_max + row, running_max, mask=head_ok)
        tl.store(part_sum + row, running_sum, mask=head_ok)
        tl.store(part_acc + row[:, None] * HEAD_DIM + dims[None, :], acc, mask=out_ok)


def merge(out, part_max, part_sum, part_acc, stride_on, stride_oh, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
          DIM_P: tl.constexpr, PARTS: tl.constexpr, PARTS_P: tl.constexpr):
    """One (sequence, query head): the partitions' maxima, sums and weighted sums merged into the output."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    parts = tl.arange(0, PARTS_P)
    part_ok = parts < PARTS
    dims = tl.arange(0, DIM_P)
    dim_ok = dims < HEAD_DIM
    row = (seq * HEADS + head) * PARTS + parts
    maxima = tl.load(part_max + row, mask=part_ok, other=float("-inf"))
    overall = tl.max(maxima, axis=0)
    weights = tl.where(part_ok, tl.exp(maxima - overall), 0.0)    # an empty partition's max is -inf: 0
    total = tl.sum(tl.load(part_sum + row, mask=part_ok, other=0.0) * weights, axis=0)
    acc = tl.load(part_acc + row[:, None] * HEAD_DIM + dims[None, :], mask=part_ok[:, None] & dim_ok[None, :],
                  other=0.0)
    result = tl.sum(acc * weights[:, None], axis=0) / total
    tl.store(out + seq * stride_on + head * stride_oh + dims, result.to(out.dtype.element_ty), mask=dim_ok)
