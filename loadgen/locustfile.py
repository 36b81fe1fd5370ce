"""The locustfile ``infemu run --load locust`` uses: exposes the user class named by INFEMU_WORKLOAD."""

import os

from loadgen.users import CLASSES

_workload = os.environ.get("INFEMU_WORKLOAD", "chat")
if _workload not in CLASSES:
    raise SystemExit(f"INFEMU_WORKLOAD={_workload!r}: unknown workload; use one of {', '.join(CLASSES)}")
globals()[CLASSES[_workload].__name__] = CLASSES[_workload]

_shape = os.environ.get("INFEMU_SHAPE")
if _shape:
    from loadgen.shapes import SHAPES

    if _shape not in SHAPES:
        raise SystemExit(f"INFEMU_SHAPE={_shape!r}: unknown shape; use one of {', '.join(SHAPES)}")
    globals()[SHAPES[_shape].__name__] = SHAPES[_shape]
