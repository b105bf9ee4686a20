"""The request class of docxy's sites: every field docxy hangs on a request is declared on
`DocxyRequest` with its default, so no reader needs getattr."""
from __future__ import annotations

import re
from pathlib import Path

import docxy
from docxy.web.site import DocxyRequest

from ..fakes import Exchange, make_site

DEFAULTS = {
    "docxy_what": ("-", ""),
    "docxy_status": "",
    "docxy_source": "local",
    "docxy_client": None,
    "docxy_user": None,
    "started": None,
}


def test_a_new_request_has_every_docxy_field_at_its_default():
    """Before any resource has seen it, a request already answers every field."""
    site, _, _ = make_site()
    request = DocxyRequest(Exchange(site).channel)
    assert {name: getattr(request, name) for name in DEFAULTS} == DEFAULTS


def test_every_docxy_field_set_anywhere_in_docxy_is_declared():
    """A `request.docxy_*` written or read anywhere in the package is one of DocxyRequest's
    declared fields: a new one must be declared (with its default) before it is used."""
    used = set()
    for path in Path(docxy.__file__).parent.rglob("*.py"):
        used |= set(re.findall(r"\.(docxy_[a-z_]+)\b", path.read_text()))
        used |= set(re.findall(r"""getattr\(\w+, "(docxy_[a-z_]+)\"""", path.read_text()))
    assert used, "the scan found nothing: the pattern is out of date"
    declared = {name for name in vars(DocxyRequest) if name.startswith("docxy_")}
    assert used <= declared, f"not declared on DocxyRequest: {sorted(used - declared)}"
