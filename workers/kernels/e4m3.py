"""E4M3 rounding inside Triton kernels, a leaf both the FP8 GEMV and the FP8
KV-cache stores use."""

from __future__ import annotations

from specserve.workers.kernels.triton_support import triton_available

FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
MIN_SCALE = 1e-12  # an all-zero row or token keeps a finite scale

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def e4m3_round(x):
        """float32 ``x`` (within +-448) rounded to the nearest E4M3 value,
        ties to even, as torch's conversion does; the cast to FP8 is then
        exact. (Done here rather than left to the cast: Triton's CPU
        interpreter drops the carry when rounding up to the next power of
        two, 1.99 -> 1.0.) Normal values keep 3 mantissa bits; below 2**-6
        the step is 2**-9."""
        bits = x.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        scaled = tl.abs(x) * 512.0
        low = tl.floor(scaled)
        frac = scaled - low
        odd = low - 2.0 * tl.floor(low * 0.5)
        up = (frac > 0.5) | ((frac == 0.5) & (odd == 1.0))
        small = tl.where(up, low + 1.0, low) / 512.0
        # The sign bit copied, so a negative value that rounds to zero stays -0
        # as in torch (on the GPU, Triton's negation is 0 - x: +0).
        sign = bits & -2147483648
        small = (small.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        return tl.where(tl.abs(x) < 0.015625, small, normal)
