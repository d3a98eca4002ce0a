"""TEST-ONLY EMULATION of ``habana_frameworks.torch.utils.experimental``: reports a Gaudi2."""


class synDeviceType:  # noqa: N801 (Habana's spelling)
    synDeviceGaudi = 1
    synDeviceGaudi2 = 2
    synDeviceGaudi3 = 3


def _get_device_type():
    return synDeviceType.synDeviceGaudi2
