"""`/v2/`: the API ping, for the upstream chosen by `ns=` or `Host` (else the default
one).  Relays the upstream's answer with every challenge pointed at this
mirror's token endpoint; in mirror mode docxy holds the upstream credentials itself and
answers 200 without asking anyone.  With the cache on and the upstream (or its token
service) unreachable it answers 200 too, so that cached content keeps being served."""
from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET

from docxy.registry.names import InvalidRequest
from docxy.stream.clients import request_gone
from docxy.upstream.bodies import discard
from docxy.upstream.errors import UpstreamError
from docxy.web.answers import (
    API_VERSION,
    answer_later,
    login_realm,
    relay,
    send_error,
    token_realm,
)
from docxy.web.resources._base import PullResource

if TYPE_CHECKING:
    from docxy.web.site import DocxyRequest  # the site imports the resources

log = Logger()


def _answer_ok(request: DocxyRequest) -> None:
    if request_gone(request):
        return
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"2")
    request.setHeader(*API_VERSION)
    request.write(b"{}")
    request.finish()


class ChallengeResource(PullResource):
    def answer(self, request: DocxyRequest) -> int:
        ctx = self.context
        request.docxy_what = ("/v2/", "")
        try:
            selection, proxy = ctx.select(request, b"/v2/")
        except InvalidRequest as e:
            ctx.policy.refused("not_mirrored")
            send_error(request, e.status, e.code, e.message)
            return NOT_DONE_YET
        if ctx.policy.auth_required:
            # docxy's own users: docxy challenges them itself (upstreams are in mirror mode)
            realm = login_realm(request, ctx.config.public_url, ctx.server_names)
            if ctx.policy.admit_user(request, realm):
                _answer_ok(request)
            return NOT_DONE_YET
        if proxy.mirror_mode:
            _answer_ok(request)
            return NOT_DONE_YET

        async def work() -> None:
            try:
                response = await proxy.ping(request.requestHeaders)
            except UpstreamError as e:
                if ctx.blobs is None:
                    raise
                # The upstream cannot be asked: let clients in, so that what the cache
                # may serve them (repositories anyone may pull, or that they were allowed
                # before) still pulls; everything else fails later with a clear error.
                log.warn("upstream unreachable ({err}); /v2/ answered by the mirror", err=e.message)
                _answer_ok(request)
                return
            if (
                response.code == 401
                and ctx.blobs is not None
                and await proxy.auth.check_token_service()
            ):
                # No client can get a token now: let them in without one, likewise.
                discard(response)
                log.warn("the upstream's token service is down; /v2/ answered by the mirror")
                _answer_ok(request)
                return
            realm = token_realm(request, ctx.config.public_url, ctx.server_names, selection)
            relay(request, response, ctx.reactor, ctx.config.idle_timeout, realm)

        return answer_later(request, work)
