"""The client side: the sites and their request class (site.py), the HTTP/1.1 connection
(channel.py), how a client is answered (answers.py: registry JSON errors, relayed upstream
responses), one client's pull as a value (pull.py), and the thin resources (resources/)."""
