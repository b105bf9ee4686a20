"""Several docxy nodes acting as one mirror: leases and shared state in Redis, the node
listener that lets peers stream a download while it runs, the keys derived from the
cluster secret.  A single node without --cluster never imports it."""
