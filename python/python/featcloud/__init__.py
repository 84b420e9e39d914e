"""featcloud: margin heads (ArcFace / CosFace / combined) with LEAP feature clouds.

The heads themselves are in :mod:`featcloud.torch` (``import featcloud.torch``; it needs
PyTorch), their class-parallel forms over ``torch.distributed`` in :mod:`featcloud.parallel`.
This module alone needs nothing but the extension:

>>> import featcloud
>>> featcloud.__version__
>>> featcloud.info()   # kernels compiled in, their archs, the CUDA device found now
"""

from . import _native

__version__: str = _native.__version__


def info() -> dict:
    """What this build holds.

    Returns a dict with ``version``; ``kernels`` (whether the CUDA kernels were compiled in,
    which needs NVRTC when the package is built); ``archs`` (the GPU architectures they were
    compiled for); and ``device`` (the CUDA device found now, or why none is usable).
    """
    return dict(_native.info())


__all__ = ["__version__", "info"]
