"""docxy: a pull-through mirror for container registries, as a twistd plugin.

Start at `docxy.tap` (command line and wiring), then `docxy.web.site` (the resource tree).
"""
__version__ = "0.1.0"
