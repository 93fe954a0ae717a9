"""What a result must say about where it was measured: package versions and the machine."""

from __future__ import annotations

import os
import platform
from importlib import metadata

PACKAGES = ("tta-server", "torch", "torchvision", "numpy", "scipy", "pillow", "imagecorruptions-imaug")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the numbers (``missing`` when absent).

    torch is reported with its build tag (``2.14.1+cu130``) and the CUDA version it was built for,
    because CPU and CUDA builds of one release run different kernels.
    """
    import torch

    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    versions["torch"] = torch.__version__
    versions["torch_cuda"] = str(torch.version.cuda)
    return versions


def machine_info() -> dict[str, str]:
    """CPU, core count and OS, plus the GPU name when CUDA is available."""
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count() or 0),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
