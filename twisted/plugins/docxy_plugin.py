"""twistd plugin: `twistd docxy` (options in docxy.tap, wiring in docxy.service)."""
from twisted.application.service import ServiceMaker

docxy = ServiceMaker(
    "docxy",
    "docxy.tap",
    "A pull-through mirror for container registries (Docker Hub and any other).",
    "docxy",
)
