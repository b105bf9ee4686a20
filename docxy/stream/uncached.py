"""An upstream body sent to one client without the cache: a `Download` with no file and
one `Follower`, so the relay is the cache's path without the file, not a second proxy.

The client's socket paces the upstream (the window fills, the upstream waits); a body that
ends early aborts the client; a client that goes away stops the upstream transfer."""
from __future__ import annotations

from twisted.logger import Logger
from twisted.web.iweb import IResponse

from docxy.stream.download import CLIENTS_GONE, Download, State
from docxy.stream.follower import Follower
from docxy.upstream.bodies import Resumer, deliver
from docxy.upstream.pace import RateCap

log = Logger()


def send_body(request, response: IResponse, reactor, idle_timeout: float,
              resumer: Resumer | None = None, cap: RateCap | None = None) -> Download:
    """Send `response`'s body to `request` (headers must already be set); with `resumer`
    a cut body is resumed from the byte reached; `cap`: the registry's bandwidth cap."""
    length = response.length if isinstance(response.length, int) else None

    def ended(download: Download) -> None:
        if download.state is State.COMPLETE:
            return
        if download.reason == CLIENTS_GONE:
            log.info("client went away after {sent} bytes of {expected}; upstream transfer "
                     "stopped", sent=follower.sent,
                     expected=length if length is not None else "?")
        else:
            log.warn("upstream body not whole ({why}); aborting the client",
                     why=download.reason)

    download = Download(length, reactor=reactor, on_end=ended)
    follower = Follower(request, 0, length, download)
    follower.start()
    deliver(response, download, reactor, idle_timeout, resumer, cap)
    return download
