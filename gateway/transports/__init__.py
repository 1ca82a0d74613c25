"""Thin adapters from the network to the use cases: parse, call, encode."""
