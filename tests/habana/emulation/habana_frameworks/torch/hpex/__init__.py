"""TEST-ONLY EMULATION of ``habana_frameworks.torch.hpex`` (fused kernels -> torch equivalents)."""
