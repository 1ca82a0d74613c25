"""Persistence: SQLAlchemy models, the database handle and the message repository."""
