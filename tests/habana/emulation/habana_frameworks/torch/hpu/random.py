"""TEST-ONLY EMULATION of ``habana_frameworks.torch.hpu.random``: a CPU generator stands in."""

import torch

_generator = torch.Generator()


def manual_seed(seed: int) -> None:
    _generator.manual_seed(int(seed))


def manual_seed_all(seed: int) -> None:
    _generator.manual_seed(int(seed))


def get_rng_state(device=None):
    return _generator.get_state()


def get_rng_state_all():
    return [_generator.get_state()]


def set_rng_state(state, device=None) -> None:
    _generator.set_state(state)


def set_rng_state_all(states) -> None:
    _generator.set_state(states[0])


def initial_seed() -> int:
    return _generator.initial_seed()
