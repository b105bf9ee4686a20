"""The registry protocol as pure functions: names and routes, challenges, headers, ranges,
which upstream a request is for, the registries mirrored and their presets.  No I/O here."""
