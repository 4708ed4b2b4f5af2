"""bonescan_platform: the Ray layer (shards, train, tune, jobs, metrics, cli).

Its source lives under ``platform/`` but it is never importable as ``platform``: that name
is the standard library's (see docs/design.md).
"""
