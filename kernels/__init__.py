"""Triton kernels of biasfast, installed as `biasfast.kernels`: one module per op, each holding the kernel and a
launcher with the op's schema. biasfast/ops/<op>.py registers the launcher as the op's CUDA kernel when triton and a
CUDA device are present; under `TRITON_INTERPRET=1` the tests call the launchers directly on CPU tensors."""
