"""Make the original EmbedSeg 0.2.5 importable and runnable on a CPU-only machine.

Run in the reference environment only, before importing ``EmbedSeg``:

* torchvision 0.28 (the only one for torch 2.13) is a CUDA build whose compiled ops cannot load
  beside the CPU torch; it registers fake kernels for ``torchvision::nms``/``qnms``, which fails
  unless their schemas exist. We define the two schemas (no torchvision kernel is ever run).
* The reference's test-time augmentation calls ``.cuda()`` unconditionally: on CPU it becomes
  the identity.
"""

from __future__ import annotations

_PREPARED = False
_LIBRARY = None


def prepare() -> None:
    global _PREPARED, _LIBRARY
    if _PREPARED:
        return
    import torch

    _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    _PREPARED = True
