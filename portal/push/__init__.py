"""Web push: browser subscriptions and their topic choices, notifications and their
delivery (RFC 8030, 8291, 8292), the panel and service worker routes, the API operations,
the worker jobs and the ``flask push`` commands."""
