"""The locustfile ``infemu run --load locust`` uses: exposes the user class named by INFEMU_WORKLOAD."""

import os

from loadgen.users import CLASSES

_workload = os.environ.get("INFEMU_WORKLOAD", "chat")
if _workload not in CLASSES:
    raise SystemExit(f"INFEMU_WORKLOAD={_workload!r}: unknown workload; use one of {', '.join(CLASSES)}")
globals()[CLASSES[_workload].__name__] = CLASSES[_workload]
