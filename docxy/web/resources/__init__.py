"""The thin twisted.web resources: each parses a request, asks one collaborator and answers.

challenge.py `/v2/` · token.py `/auth/token` · registry.py `/v2/<name>/...` ·
health.py `/health` · redirect.py plain HTTP to HTTPS.
"""
