"""Completion notifications: webhooks and email, delivered from a durable outbox."""
