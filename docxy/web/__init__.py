"""The client side: the sites and their connections, how a client is answered (registry JSON
errors, relayed upstream responses), and the thin resources."""
