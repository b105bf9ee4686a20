"""twistd plugin: `twistd docxy` (all wiring lives in docxy.tap)."""
from twisted.application.service import ServiceMaker

docxy = ServiceMaker(
    "docxy",
    "docxy.tap",
    "A pull-through mirror for container registries (Docker Hub and any other).",
    "docxy",
)
