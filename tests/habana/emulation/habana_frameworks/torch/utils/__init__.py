"""TEST-ONLY EMULATION of ``habana_frameworks.torch.utils``."""
