"""The `docxy` command: an operator's client of the admin API (docxy.web.resources.admin)."""
