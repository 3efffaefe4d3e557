"""Triton kernels for lora_mix_linear (GPU, or CPU tensors under TRITON_INTERPRET=1)."""
