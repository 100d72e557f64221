"""Federated machinery: client/server messages, communication accounting and server-side strategies (DESIGN §1–4)."""
