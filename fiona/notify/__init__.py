"""E-mail notifications: subscriptions per user and project, notices derived from durable
state by the periodic job `fiona notify`, queued durably, mailed as digests."""
