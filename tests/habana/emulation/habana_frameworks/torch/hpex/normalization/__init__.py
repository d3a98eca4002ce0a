"""TEST-ONLY EMULATION of Habana's ``FusedClipNorm``: torch's ``clip_grad_norm_``, calls recorded."""

import torch

from habana_emulation import record_call


class FusedClipNorm:
    def __init__(self, parameters, max_norm):
        record_call("FusedClipNorm")
        self.max_norm = float(max_norm)

    def clip_norm(self, parameters):
        record_call("FusedClipNorm.clip_norm")
        return torch.nn.utils.clip_grad_norm_(parameters, self.max_norm)
