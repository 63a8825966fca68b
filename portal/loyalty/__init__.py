"""Loyalty: the programme read from the catalog, members and their append-only ledger
(earn, redeem, reverse, expiry by lots, tiers), the portal page, the API operations, the
jobs and the ``flask loyalty`` commands."""
