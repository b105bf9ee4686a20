"""`/v2/`: the API ping.  Relays the upstream's answer with every challenge pointed at this
mirror's token endpoint; in mirror mode docxy holds the upstream credentials itself and
answers 200 without asking anyone."""
from __future__ import annotations

from docxy.answers import API_VERSION, answer_later, relay, token_realm
from docxy.resources._base import PullResource


class ChallengeResource(PullResource):
    def answer(self, request):
        ctx = self.context
        request.docxy_what = ("/v2/", "")
        if ctx.proxy.mirror_mode:
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"2")
            request.setHeader(*API_VERSION)
            return b"{}"

        async def work() -> None:
            response = await ctx.proxy.ping(request.requestHeaders)
            realm = token_realm(request, ctx.config.public_url, ctx.server_names)
            relay(request, response, ctx.reactor, ctx.config.idle_timeout, realm)

        return answer_later(request, work)
