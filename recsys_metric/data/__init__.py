"""Interaction logs: readers, validation with quarantine, vocabularies, splits, synthetic logs."""
