"""`/auth/token`: the token endpoint clients are sent to by docxy's challenges.  Forwards
GET and containerd's POST form flow to the upstream's token service with the upstream's
service name and `library/` added to bare names; Basic credentials pass through."""
from __future__ import annotations

from urllib.parse import parse_qsl

from twisted.web.server import NOT_DONE_YET

from docxy.answers import answer_later, relay, send_error
from docxy.resources._base import LeafResource, query_pairs


class TokenResource(LeafResource):
    def render_GET(self, request):
        request.docxy_what = ("/auth/token", "")
        ctx = self.context

        async def work() -> None:
            response = await ctx.proxy.token(
                b"GET", query_pairs(request), None, request.requestHeaders
            )
            relay(request, response, ctx.reactor, ctx.config.idle_timeout, None)

        return answer_later(request, work)

    def render_POST(self, request):
        request.docxy_what = ("/auth/token", "")
        ctx = self.context
        body = request.content.read(ctx.config.max_token_body + 1)
        if len(body) > ctx.config.max_token_body:
            send_error(request, 413, "SIZE_INVALID", "token request too large")
            return NOT_DONE_YET
        try:
            form = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            send_error(request, 400, "UNSUPPORTED", "token request form is not UTF-8")
            return NOT_DONE_YET

        async def work() -> None:
            response = await ctx.proxy.token(
                b"POST", query_pairs(request), form, request.requestHeaders
            )
            relay(request, response, ctx.reactor, ctx.config.idle_timeout, None)

        return answer_later(request, work)
