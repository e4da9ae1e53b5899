"""Triton fused pointwise -> depthwise kernel: act2(dw(act1(pw(x) + mid_bias)) + bias).

Halo handling: each program owns an output tile of TH x TW pixels and BLOCK_C channels. It
computes the pointwise result for the whole haloed input tile it needs, HIN x WIN positions
with HIN = (TH - 1) * stride + (KH - 1) * dilation + 1, with tl.dot over Cin blocks, writes it
to a per-program scratch slab, and then runs the depthwise taps reading the slab back. The slab
is small (a few tens of KB) and is re-read right away by the same program, so it is served from
L1/L2 and the full intermediate never goes to DRAM. Compared with the alternatives:
  * per-tap recompute multiplies the pointwise work by KH * KW (9x at 3x3): only viable for tiny
    Cin, and the pointwise GEMM is the dominant cost;
  * tl.gather across a register tile needs the haloed rows in the same program anyway, and is
    not available on every Triton version we support (3.6 in the GPU image, 3.9 here);
  * the haloed tile costs HIN * WIN / (TH * TW) times the pointwise work: 1.27x for a 16x16 tile
    at 3x3 stride 1 (1.56x at 8x8), paid in tensor-core FLOPs, which are cheap for these layers.
The grid is persistent (a bounded number of programs loop over tiles) so that the scratch
memory is bounded by the number of programs, not by the problem size. Tile sizes are a
heuristic until they are tuned on a GPU (no GPU was available when this was written).
"""
import os

import torch
import triton
import triton.language as tl

from bsconv_fast import ops


@triton.jit
def _activation(v, ACT: tl.constexpr):
    if ACT == 1:
        v = tl.maximum(v, 0.0)
    elif ACT == 2:
        v = tl.minimum(tl.maximum(v, 0.0), 6.0)
    elif ACT == 3:
        v = v * tl.minimum(tl.maximum(v + 3.0, 0.0), 6.0) / 6.0
    elif ACT == 4:
        v = v / (1.0 + tl.exp(-v))
    return v


@triton.jit
def _pw_dw_kernel(x_ptr, wpw_ptr, b1_ptr, wdw_ptr, b2_ptr, y_ptr, scratch_ptr,
                  CIN, H, W, COUT, OH, OW, PH, PW,
                  sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                  TILES_W, TILES_PER_IMG, TOTAL_TILES,
                  KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                  DH: tl.constexpr, DW: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
                  BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                  HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACT1: tl.constexpr, ACT2: tl.constexpr,
                  PRECISION: tl.constexpr):
    HIN: tl.constexpr = (TH - 1) * SH + (KH - 1) * DH + 1
    WIN: tl.constexpr = (TW - 1) * SW + (KW - 1) * DW + 1
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < COUT
    lanes_c = tl.arange(0, BLOCK_C)
    scratch = scratch_ptr + (pid * tl.num_programs(1) + pid_c) * (HIN * WIN * BLOCK_C)
    if HAS_B1:
        b1 = tl.load(b1_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    if HAS_B2:
        b2 = tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    for tile in range(pid, TOTAL_TILES, tl.num_programs(0)):
        n = tile // TILES_PER_IMG
        t = tile % TILES_PER_IMG
        oh0 = (t // TILES_W) * TH
        ow0 = (t % TILES_W) * TW
        ih0 = oh0 * SH - PH
        iw0 = ow0 * SW - PW
        x_img = x_ptr + n.to(tl.int64) * sxn
        # Stage 1: pointwise on the haloed tile -> scratch (zero where the input is padding).
        for q0 in range(0, HIN * WIN, BLOCK_Q):
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            ih = ih0 + offs_q // WIN
            iw = iw0 + offs_q % WIN
            valid = (offs_q < HIN * WIN) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
            for k0 in range(0, CIN, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < CIN
                a = tl.load(x_img + ih[:, None] * sxh + iw[:, None] * sxw + offs_k[None, :] * sxc,
                            mask=valid[:, None] & mask_k[None, :], other=0.0)
                b = tl.load(wpw_ptr + offs_c[None, :] * CIN + offs_k[:, None],
                            mask=mask_k[:, None] & mask_c[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if HAS_B1:
                acc += b1[None, :]
            acc = _activation(acc, ACT1)
            acc = tl.where(valid[:, None], acc, 0.0)  # the depthwise zero padding comes after act1
            tl.store(scratch + offs_q[:, None] * BLOCK_C + lanes_c[None, :], acc,
                     mask=(offs_q < HIN * WIN)[:, None])
        tl.debug_barrier()  # the slab is written by all threads of the program, read by others
        # Stage 2: depthwise taps from the slab.
        offs_p = tl.arange(0, TH * TW)
        ph = offs_p // TW
        pw = offs_p % TW
        oh = oh0 + ph
        ow = ow0 + pw
        mask_p = (oh < OH) & (ow < OW)
        out = tl.zeros((TH * TW, BLOCK_C), dtype=tl.float32)
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                q = (ph * SH + kh * DH) * WIN + (pw * SW + kw * DW)
                v = tl.load(scratch + q[:, None] * BLOCK_C + lanes_c[None, :], mask=mask_p[:, None], other=0.0)
                wk = tl.load(wdw_ptr + offs_c * (KH * KW) + (kh * KW + kw), mask=mask_c, other=0.0)
                out += v * wk.to(tl.float32)[None, :]
        if HAS_B2:
            out += b2[None, :]
        out = _activation(out, ACT2)
        y_img = y_ptr + n.to(tl.int64) * syn
        tl.store(y_img + oh[:, None] * syh + ow[:, None] * syw + offs_c[None, :] * syc,
                 out.to(y_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])
        tl.debug_barrier()  # the next tile overwrites the slab


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_KERNEL = 7


def interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _config(cin, cout, kernel, stride, dilation):
    """(TH, TW, BLOCK_Q, BLOCK_C, BLOCK_K, num_warps): a heuristic until tuned on a GPU."""
    th, tw = (8, 8) if max(stride) == 1 else (4, 8)
    block_c = min(64, max(16, triton.next_power_of_2(cout)))
    block_k = min(64, max(16, triton.next_power_of_2(cin)))
    return th, tw, 64, block_c, block_k, 4


def _programs(device, total_tiles, c_blocks):
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(total_tiles, 4 * sms // max(1, c_blocks) or 1))
    return min(total_tiles, 4)  # interpreter: a few programs exercise the persistent loop


def pw_dw_triton(x, pw_weight, dw_weight, mid_bias, bias, stride, padding, dilation, mid_act, out_act):
    """Launch the fused Triton kernel. Arguments as bsconv_fast::pw_dw (validated by the caller)."""
    n, cin, h, w = x.shape
    cout = pw_weight.shape[0]
    kh, kw = dw_weight.shape[2:]
    # the same shape and memory format as the op's fake kernel promises
    y = ops.empty_output(x, ops.pw_dw_out_shape(x, pw_weight, dw_weight, stride, padding, dilation))
    oh, ow = y.shape[2:]
    if os.environ.get("BSCONV_FAST_POISON") == "1":
        y.fill_(float("nan"))
    if y.numel() == 0:
        return y
    th, tw, block_q, block_c, block_k, warps = _config(cin, cout, (kh, kw), stride, dilation)
    tiles_h, tiles_w = triton.cdiv(oh, th), triton.cdiv(ow, tw)
    total = n * tiles_h * tiles_w
    c_blocks = triton.cdiv(cout, block_c)
    programs = _programs(x.device, total, c_blocks)
    hin = (th - 1) * stride[0] + (kh - 1) * dilation[0] + 1
    win = (tw - 1) * stride[1] + (kw - 1) * dilation[1] + 1
    scratch = torch.empty(programs * c_blocks * hin * win * block_c, dtype=torch.float32, device=x.device)
    wpw = pw_weight.reshape(cout, cin).contiguous()
    wdw = dw_weight.reshape(cout, kh * kw).contiguous()
    allow_tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    precision = "tf32" if allow_tf32 else "ieee"
    _pw_dw_kernel[(programs, c_blocks)](
        x, wpw, mid_bias if mid_bias is not None else wpw, wdw, bias if bias is not None else wpw, y, scratch,
        cin, h, w, cout, oh, ow, padding[0], padding[1],
        *x.stride(), *y.stride(), tiles_w, tiles_h * tiles_w, total,
        KH=kh, KW=kw, SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1], TH=th, TW=tw,
        BLOCK_Q=block_q, BLOCK_C=block_c, BLOCK_K=block_k, HAS_B1=mid_bias is not None, HAS_B2=bias is not None,
        ACT1=mid_act, ACT2=out_act, PRECISION=precision, num_warps=warps)
    return y
