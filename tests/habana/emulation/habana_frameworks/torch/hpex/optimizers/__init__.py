"""TEST-ONLY EMULATION of Habana's fused optimizers: ``FusedAdamW`` is torch's ``AdamW``.

Records each instantiation so tests can check that GaudiTrainer chose the fused optimizer
(``GaudiConfig.use_fused_adam``).
"""

import torch

from habana_emulation import record_call


class FusedAdamW(torch.optim.AdamW):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, **kwargs):
        record_call("FusedAdamW")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
