"""Python side of the torch.library ops declared in csrc/bsconv.cpp: fake (meta) kernels for
torch.compile / export, and autograd. Backward recomputes the intermediate from the saved
inputs with standard ops instead of keeping it alive from the forward pass."""
import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

from bsconv_fast import _ext
from bsconv_fast.reference import activation

aten = torch.ops.aten


def conv_out_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def out_shape(x, out_channels, kernel, stride, padding, dilation):
    """Output shape of the fused op for input x (N, C, H, W)."""
    n, _, h, w = x.shape
    return (n, out_channels, conv_out_size(h, kernel[0], stride[0], padding[0], dilation[0]),
            conv_out_size(w, kernel[1], stride[1], padding[1], dilation[1]))


def pw_dw_out_shape(x, pw_weight, dw_weight, stride, padding, dilation):
    return out_shape(x, pw_weight.shape[0], dw_weight.shape[2:], stride, padding, dilation)


def empty_output(x, shape):
    """Uninitialised output in the memory format the kernels give (the input's, as suggested)."""
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))


def _act_backward(grad, pre, code):
    """d act(pre) / d pre applied to grad, with the same ATen kernels autograd uses."""
    if code == 0:
        return grad
    if code == 1:
        return aten.threshold_backward(grad, pre, 0)
    if code == 2:
        return aten.hardtanh_backward(grad, pre, 0.0, 6.0)
    if code == 3:
        return aten.hardswish_backward(grad, pre)
    return aten.silu_backward(grad, pre)


if _ext.available():

    @torch.library.register_fake("bsconv_fast::pw_dw")
    def _pw_dw_fake(x, pw_weight, dw_weight, mid_bias, bias, stride, padding, dilation, mid_act, out_act):
        return empty_output(x, pw_dw_out_shape(x, pw_weight, dw_weight, stride, padding, dilation))

    @torch.library.register_fake("bsconv_fast::pack")
    def _pack_fake(pw_weight, dw_weight, mid_bias, bias):
        cout, cin = pw_weight.shape[:2]
        cp = -(-cout // 16) * 16
        taps = dw_weight.shape[2] * dw_weight.shape[3]
        return pw_weight.new_empty((cp * cin + taps * cp + 2 * cp,))

    @torch.library.register_fake("bsconv_fast::pw_dw_packed")
    def _pw_dw_packed_fake(x, packed, out_channels, kernel, stride, padding, dilation, mid_act, out_act, residual=None):
        return empty_output(x, out_shape(x, out_channels, kernel, stride, padding, dilation))

    torch.library.register_fake("bsconv_fast::dw_packed")(_pw_dw_packed_fake)  # same arguments and output

    @torch.library.register_fake("bsconv_fast::pw_dw_pair_packed")
    def _pw_dw_pair_packed_fake(x, packed, out_channels, kernel, stride, padding, dilation, mid_act, out_act, packed2,
                                out_channels2, kernel2, stride2, padding2, dilation2, mid_act2, out_act2, residual):
        mid = x.new_empty(out_shape(x, out_channels, kernel, stride, padding, dilation))
        return empty_output(x, out_shape(mid, out_channels2, kernel2, stride2, padding2, dilation2))

    @torch.library.register_fake("bsconv_fast::pack_pw")
    def _pack_pw_fake(weight, bias):
        cout, cin = weight.shape[:2]
        cp = -(-cout // 16) * 16
        return weight.new_empty((cp * cin + 2 * cp,))

    @torch.library.register_fake("bsconv_fast::pack_winograd")
    def _pack_winograd_fake(weight, bias):
        cout, cin = weight.shape[:2]
        cp = -(-cout // 16) * 16
        return weight.new_empty((49 * 4 * cin * cp + 2 * cp,))

    @torch.library.register_fake("bsconv_fast::pw_packed")
    def _pw_packed_fake(x, packed, out_channels, stride, act, residual):
        return empty_output(x, out_shape(x, out_channels, (1, 1), stride, (0, 0), (1, 1)))

    # The stems write channels_last whatever x's layout (they read an NCHW image as it is).
    @torch.library.register_fake("bsconv_fast::conv_packed")
    def _conv_packed_fake(x, packed, out_channels, kernel, stride, padding, act, in_scale=None, in_shift=None,
                          winograd=False):
        shape = out_shape(x, out_channels, kernel, stride, padding, (1, 1))
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)

    @torch.library.register_fake("bsconv_fast::conv_pool_packed")
    def _conv_pool_packed_fake(x, packed, out_channels, kernel, stride, padding, act, pool_kernel, pool_stride,
                               pool_padding, in_scale=None, in_shift=None, winograd=False):
        n, _, h, w = out_shape(x, out_channels, kernel, stride, padding, (1, 1))
        shape = (n, out_channels, conv_out_size(h, pool_kernel[0], pool_stride[0], pool_padding[0], 1),
                 conv_out_size(w, pool_kernel[1], pool_stride[1], pool_padding[1], 1))
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)

    @torch.library.register_fake("bsconv_fast::channel_affine")
    def _channel_affine_fake(x, scale, shift):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)

    @torch.library.register_fake("bsconv_fast::max_pool")
    def _max_pool_fake(x, kernel, stride, padding):
        return empty_output(x, out_shape(x, x.shape[1], kernel, stride, padding, (1, 1)))

    @torch.library.register_fake("bsconv_fast::global_avg_pool")
    def _global_avg_pool_fake(x):
        return x.new_empty((x.shape[0], x.shape[1], 1, 1))

    def _setup_context(ctx, inputs, output):
        x, pw_weight, dw_weight, mid_bias, bias, stride, padding, dilation, mid_act, out_act = inputs
        ctx.save_for_backward(x, pw_weight, dw_weight, mid_bias, bias)
        ctx.conv = (list(stride), list(padding), list(dilation), mid_act, out_act)

    def _backward(ctx, grad):
        x, pw_weight, dw_weight, mid_bias, bias = ctx.saved_tensors
        stride, padding, dilation, mid_act, out_act = ctx.conv
        need = ctx.needs_input_grad
        channels = pw_weight.shape[0]
        # Recompute the intermediate (the forward never materialised it).
        z = F.conv2d(x, pw_weight)
        if mid_bias is not None:
            z = z + mid_bias.view(1, -1, 1, 1)
        a = activation(z, mid_act)
        if out_act != 0:
            pre = F.conv2d(a, dw_weight, bias, stride, padding, dilation, channels)
            grad = _act_backward(grad, pre, out_act)
        need_a = need[0] or need[1] or need[3]
        ga, g_dw, g_bias = aten.convolution_backward(
            grad, a, dw_weight, [channels] if bias is not None else None, stride, padding, dilation,
            False, [0, 0], channels, [need_a, need[2], need[4] and bias is not None])
        g_x = g_pw = g_mid = None
        if need_a:
            gz = _act_backward(ga, z, mid_act)
            if need[3] and mid_bias is not None:
                g_mid = gz.sum((0, 2, 3))
            if need[0] or need[1]:
                g_x, g_pw, _ = aten.convolution_backward(
                    gz, x, pw_weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                    [need[0], need[1], False])
        return g_x, g_pw, g_dw, g_mid, g_bias, None, None, None, None, None

    torch.library.register_autograd("bsconv_fast::pw_dw", _backward, setup_context=_setup_context)

    @torch.library.register_kernel("bsconv_fast::pw_dw", "cuda")
    def _pw_dw_cuda(x, pw_weight, dw_weight, mid_bias, bias, stride, padding, dilation, mid_act, out_act):
        from bsconv_fast import dispatch  # the same choice explain() reports
        args = (x, pw_weight, dw_weight, mid_bias, bias, stride, padding, dilation, mid_act, out_act)
        if dispatch.gpu_backends()[0].name == "gpu-fused (cuda)" and dispatch.cuda_kernel_built():
            return torch.ops.bsconv_fast.pw_dw_cuda(*args)
        # Imported on first use: triton is optional and slow to import.
        from bsconv_fast.triton.pw_dw import pw_dw_triton
        return pw_dw_triton(*args)


def pw_dw(x, pw_weight, dw_weight, mid_bias, bias, stride, padding, dilation, mid_act, out_act):
    """The fused op as registered (CPU: C++ kernel; CUDA: the registered GPU kernel)."""
    return torch.ops.bsconv_fast.pw_dw(x, pw_weight, dw_weight, mid_bias, bias, list(stride),
                                       list(padding), list(dilation), mid_act, out_act)
