"""Operators' handles on the cache: warm-ups (now and scheduled) and retention; the admin
API that drives them is docxy.web.resources.admin, the `docxy` command docxy.cli."""
