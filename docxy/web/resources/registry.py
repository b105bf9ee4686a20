"""`/v2/<name>/manifests|blobs|tags|referrers/<reference>`: picks the upstream (see
docxy.registry.selection), checks the path against the registry grammar before anything goes
upstream, then answers from the cache or relays the upstream answer.  HEAD stays HEAD
upstream (a HEAD costs no pull on Hub) and keeps the upstream Content-Length.  Referrers
(the OCI 1.1 API) are admitted and rate-limited as manifests are."""
from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.server import NOT_DONE_YET

from docxy.registry.names import InvalidRequest, parse_route, upstream_name
from docxy.registry.referrers import artifact_type_filter
from docxy.web.answers import answer_later, login_realm, relay, send_error, token_realm
from docxy.web.pull import Pull
from docxy.web.resources._base import PullResource, query_pairs

if TYPE_CHECKING:
    from docxy.web.site import DocxyRequest  # the site imports the resources


class RegistryResource(PullResource):
    def answer(self, request: DocxyRequest) -> int:
        ctx = self.context
        policy = ctx.policy
        try:
            selection, proxy = ctx.select(request, request.path)
            route = parse_route(selection.path)
            # checked here, so that a filter that is not a media type never goes upstream
            artifact_type = (
                artifact_type_filter(query_pairs(request)) if route.kind == "referrers" else None
            )
            name = upstream_name(route.name, proxy.library)
            request.docxy_what = (f"{proxy.name}/{name}", route.reference)
            proxy.check_allowed([name])
        except InvalidRequest as e:
            if e.code in ("NAME_UNKNOWN", "DENIED"):
                policy.refused("not_mirrored" if e.code == "NAME_UNKNOWN" else "repository")
            send_error(request, e.status, e.code, e.message)
            return NOT_DONE_YET  # the error is already written
        if policy.auth_required:
            scope = f"repository:{selection.scope_prefix or ''}{route.name}:pull"
            realm_url = login_realm(request, ctx.config.public_url, ctx.server_names)
            if not policy.admit_user(request, realm_url, scope):
                return NOT_DONE_YET
        # A manifest is what a pull costs upstream (Hub counts manifest GETs): rate-limit
        # those, and referrers, which cost a manifest's work.
        rated = route.kind in ("manifests", "referrers") and policy.limiter is not None

        def later(work):
            async def admitted() -> None:
                if not rated or await policy.admit_rate(request):
                    await work()
            return answer_later(request, admitted)

        realm = (
            None
            if proxy.mirror_mode
            else token_realm(request, ctx.config.public_url, ctx.server_names, selection)
        )
        if route.kind == "manifests" and ctx.manifests is not None:
            manifests = ctx.manifests
            return later(lambda: manifests.answer(Pull(request, proxy, route, realm)))
        if route.kind == "referrers" and ctx.manifests is not None \
                and ctx.manifests.referrers is not None:
            referrers = ctx.manifests.referrers
            return later(lambda: referrers.answer(Pull(request, proxy, route, realm), artifact_type))
        blobs = ctx.blobs
        if (
            blobs is not None
            and route.kind == "blobs"
            and (request.method == b"GET" or blobs.holds(route.reference))
        ):
            # GETs go through the cache; a HEAD of a blob not held stays a HEAD upstream.
            return later(lambda: blobs.answer(Pull(request, proxy, route, realm)))

        async def work() -> None:
            response = await proxy.pull(
                route, request.method, request.requestHeaders, query_pairs(request)
            )
            resumer = proxy.resumer(route, request.requestHeaders) if request.method == b"GET" else None
            cap = proxy.cap if route.kind == "blobs" else None
            relay(request, response, ctx.reactor, ctx.config.idle_timeout, realm, resumer, cap)

        return later(work)
