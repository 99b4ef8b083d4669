"""Datasets editguard ships or reads: CounterFact records and WikiText text."""
