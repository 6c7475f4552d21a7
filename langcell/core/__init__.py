"""The ground every stage stands on: errors, files (atomic writes, locks, checksums), configs.

It imports no stage and nothing above it (see tests/test_langcell_layers.py).
"""
