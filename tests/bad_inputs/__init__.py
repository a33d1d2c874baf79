"""The bad-input corpus: see README.md in this directory and tests/test_bad_inputs.py."""
