"""Triton helpers shared by the kernels.

`dot` is the one place a bf16 `tl.dot` is written. Under TRITON_INTERPRET=1 (Triton
3.6 and 3.9 checked) a bf16 dot multiplies raw bit patterns (triton-lang/triton#11584),
so when the caller says it is interpreting, the operands are upcast to fp32, which the
interpreter computes exactly; on a GPU the bf16 tensor-core dot is kept. fp16, fp8,
int8 and fp32 dots are exact in the interpreter and need no detour, but going through
`dot` costs nothing and keeps the rule simple: every tl.dot goes through here.
"""

import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, INTERPRET: tl.constexpr):
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)
