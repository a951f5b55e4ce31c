"""BTAD (beanTech Anomaly Detection, Mishra et al. 2021): three products, ``01``, ``02``, ``03``.

    <root>/<01|02|03>/train/ok/*.bmp|*.png
    <root>/<01|02|03>/test/ok/*.bmp|*.png
    <root>/<01|02|03>/test/ko/*.bmp|*.png
    <root>/<01|02|03>/ground_truth/ko/<stem>.png   (or .bmp; ``<stem>_mask.png`` is accepted too)

This is the MVTec AD layout with ``ok`` for ``good`` and masks named like their image, so
the adapter is :class:`MVTecLayout` with those names; ``ok`` test images get the defect
type ``good``, ``ko`` ones the defect type ``ko``.

Textures: none. The paper describes the three as industrial products; 02 in particular
looks texture-like, but we are not sure enough of that to mark it as a texture.
Marking none is the safe choice: under ``data.foreground=auto`` the foreground estimate
of an object category falls back to all ones when the object fills the frame (see
orchestrator/data/foreground.py), which is the texture behaviour anyway;
``data.foreground=off`` forces it.
"""

from __future__ import annotations

from orchestrator.data.mvtec import MVTecLayout

BTAD_LAYOUT = "<root>/<01|02|03>/train/ok/*.bmp, <root>/<cat>/test/{ok,ko}/*.bmp, <root>/<cat>/ground_truth/ko/<stem>.png"


def btad() -> MVTecLayout:
    return MVTecLayout("btad", textures=frozenset(), good="ok", mask_suffix="", layout=BTAD_LAYOUT)
