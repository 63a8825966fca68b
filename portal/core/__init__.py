"""Shared infrastructure with no domain knowledge: configuration, the database and fast
row reads, languages, security headers, errors, mail, signed tokens, rate limits and the
destination rule for outbound requests."""
