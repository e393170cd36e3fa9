"""Jumpstarter gRPC transport."""
